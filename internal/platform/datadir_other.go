//go:build !unix

package platform

// lockDataDir does not lock where flock is missing.
func lockDataDir(string) (func(), error) { return func() {}, nil }
