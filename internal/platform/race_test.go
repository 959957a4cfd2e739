//go:build race

package platform

// raceEnabled: the race detector slows everything about tenfold, so the
// soak test runs a smaller count under it (the full count runs without).
const raceEnabled = true
