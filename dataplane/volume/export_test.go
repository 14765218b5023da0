package volume

// SetMaxOwnBitmap sets the largest own diff a backup sends in its
// handshake, for the test's duration.
func SetMaxOwnBitmap(t interface{ Cleanup(func()) }, n int) {
	old := maxOwnBitmap
	maxOwnBitmap = n
	t.Cleanup(func() { maxOwnBitmap = old })
}

// TrackedRegions is the number of regions in v's tracker of member node
// (-1: none).
// TrackedHas reports whether v's tracker of node marks the region holding
// byte off (false without such a tracker).
func TrackedHas(v *Volume, node string, off int64) bool {
	v.mu.Lock()
	t := v.trackers[node]
	v.mu.Unlock()
	return t != nil && t.Dirty().Contains(uint32(off/v.opts.RegionSize))
}

func TrackedRegions(v *Volume, node string) int {
	v.mu.Lock()
	t := v.trackers[node]
	v.mu.Unlock()
	if t == nil {
		return -1
	}
	return int(t.Count())
}
