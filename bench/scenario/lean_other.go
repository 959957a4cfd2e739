//go:build !linux

package scenario

func newLeanEngine(f *LeanFleet, _ int) (leanEngine, error) {
	return newGoEngine(f), nil
}
