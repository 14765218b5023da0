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

// SetGrowHook makes fn run after each step of Grow ("store", "journal",
// "meta"); an error from it stops the grow there.
func SetGrowHook(v *Volume, fn func(step string) error) {
	v.growMu.Lock()
	v.growTestHook = fn
	v.growMu.Unlock()
}

// Crash abandons v as a killed agent would: its links and streams stop, no
// final checkpoint and no metadata are written (the journal keeps its logs
// for recovery), and what was written to the store stays as it is (a
// process crash keeps the page cache). Close is a no-op afterwards.
func Crash(v *Volume) {
	v.mu.Lock()
	v.closed = true
	ps, b := v.peers, v.backupConn
	v.peers = withoutLinks(ps)
	v.backupConn = nil
	v.notifyLocked()
	v.mu.Unlock()
	for _, p := range ps {
		if p.link != nil {
			p.link.stop()
		}
	}
	if b != nil {
		b.stop(ErrClosed)
	}
	close(v.stop)
	v.wg.Wait()
	_ = v.journal.Close(nil)
	_ = v.store.Close()
}
