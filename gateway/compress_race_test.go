//go:build race

package gateway

const compressRaceEnabled = true
