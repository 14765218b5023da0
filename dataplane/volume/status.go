package volume

import "fmt"

// Status reports the actual state.
func (v *Volume) Status() Status {
	fault := v.Fault()
	v.mu.Lock()
	st := Status{
		Name: v.opts.Name, Size: v.opts.Size, RegionSize: v.opts.RegionSize,
		Role: v.role, Epoch: v.epoch, Mode: v.spec.Mode, DataState: v.dataState,
		Joined: v.joined, PairUID: v.pairUID, UnmergedRegions: v.unmerged.GetCardinality(),
		PeerNode: v.spec.PeerNode, BitmapsLost: v.bitmapsLost,
		Holding: !v.holdStart.IsZero(), LastHoldSeconds: v.lastHold.Seconds(),
		LastError: v.lastErr, LastErrorTime: v.lastErrTime,
	}
	if err := v.writableLocked(); err != nil {
		st.Reason = err.Error()
	} else if fault != nil {
		st.Reason = fault.Error()
	} else {
		st.Writable = true
	}
	switch {
	case !v.joined || (v.spec.PairUID != "" && !v.holdsLocked(v.spec.PairUID)):
		st.DataStateReason = v.identityReasonLocked(v.spec.PairUID)
	case v.dataState == Inconsistent:
		st.DataStateReason = v.dataReason
		if st.DataStateReason == "" {
			st.DataStateReason = reasonCopying
		}
	}
	if !v.holdStart.IsZero() {
		st.HoldSeconds = v.opts.Clock.Since(v.holdStart).Seconds()
	}
	l, b := v.link, v.backupConn
	inflight := v.inflight
	v.mu.Unlock()

	st.OutOfSyncRegions = v.tracker.Count()
	st.OutOfSyncBytes = v.tracker.Bytes()
	if l != nil {
		ls := l.status()
		st.PeerConnected = ls.streaming
		st.Copy = ls.copy
		st.OldestUnreplicatedSeconds = ls.oldest.Seconds()
		st.Drained = st.Holding && inflight == 0 && ls.streaming && ls.copyDone && st.OutOfSyncRegions == 0 && ls.allAcked
	}
	if b != nil {
		st.PeerConnected = b.connected()
	}
	st.Copy.CopiedBytesTotal = v.copiedTotal.Load()
	st.WaitingForPeerOutdated = v.waitingAlone.Load()
	st.HeldWrites = v.heldWrites.Load()
	st.ForwardedWrites = v.forwarded.Load()
	st.Counters = Counters{
		Writes: v.ctr.writes.Load(), WriteBytes: v.ctr.writeBytes.Load(),
		Reads: v.ctr.reads.Load(), ReadBytes: v.ctr.readBytes.Load(), Flushes: v.ctr.flushes.Load(),
		FramesSent: v.ctr.framesSent.Load(), FramesApplied: v.ctr.framesApplied.Load(),
		Reconnects: v.ctr.reconnects.Load(), RejectedFrames: v.ctr.rejected.Load(),
	}
	return st
}

// writableLocked returns nil when client writes are accepted now.
func (v *Volume) writableLocked() error {
	if v.closed {
		return ErrClosed
	}
	if v.role != RolePrimary {
		return fmt.Errorf("member %s is %s at epoch %d: %w", v.opts.Node, v.role, v.epoch, ErrNotWriter)
	}
	if err := v.auth.Authorized(v.opts.Name, v.epoch); err != nil {
		return fmt.Errorf("member %s is fenced at epoch %d: %w: %w", v.opts.Node, v.epoch, err, ErrNotWriter)
	}
	return nil
}

// Writable returns nil when this member serves client I/O, else the reason.
func (v *Volume) Writable() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.writableLocked()
}

// DirtyRanges returns the dirty regions as inclusive [first, last] runs.
func (v *Volume) DirtyRanges() [][2]uint32 {
	var out [][2]uint32
	it := v.tracker.Dirty().Iterator()
	for it.HasNext() {
		r := it.Next()
		if n := len(out); n > 0 && out[n-1][1]+1 == r {
			out[n-1][1] = r
			continue
		}
		out = append(out, [2]uint32{r, r})
	}
	return out
}
