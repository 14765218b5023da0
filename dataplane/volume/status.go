package volume

import (
	"fmt"
	"slices"
)

// Status reports the actual state.
func (v *Volume) Status() Status {
	fault := v.Fault()
	v.mu.Lock()
	st := Status{
		Name: v.opts.Name, Size: v.size.Load(), RegionSize: v.opts.RegionSize,
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
	ps, b := v.peers, v.backupConn
	st.Tracked = slices.Clone(v.tracked)
	isWriter := v.role == RolePrimary
	alone := make([]bool, len(ps))
	for i, p := range ps {
		alone[i] = v.alone[p.node] == v.epoch && v.epoch != 0
	}
	inflight := v.inflight
	v.mu.Unlock()

	if len(ps) == 1 {
		st.OutOfSyncRegions, st.OutOfSyncBytes = ps[0].tr.Count(), ps[0].tr.Bytes()
	} else {
		u := v.dirty()
		st.OutOfSyncRegions, st.OutOfSyncBytes = u.GetCardinality(), v.regionBytes(u)
	}
	links, drained := 0, st.Holding && inflight == 0 && st.OutOfSyncRegions == 0
	connected := true
	for i, p := range ps {
		ps := PeerStatus{Node: p.node, Mode: p.Mode, Outdated: alone[i],
			OutOfSyncRegions: p.tr.Count(), OutOfSyncBytes: p.tr.Bytes()}
		if p.link != nil {
			links++
			ls := p.link.status()
			ps.Connected, ps.Copy, ps.OldestUnreplicatedSeconds = ls.streaming, ls.copy, ls.oldest.Seconds()
			ps.Drained = st.Holding && inflight == 0 && ls.streaming && ls.copyDone && ls.allAcked && ps.OutOfSyncRegions == 0
			drained = drained && ls.streaming && ls.copyDone && ls.allAcked
			st.OldestUnreplicatedSeconds = max(st.OldestUnreplicatedSeconds, ps.OldestUnreplicatedSeconds)
			addCopy(&st.Copy, ps.Copy)
		} else {
			drained = false
		}
		connected = connected && ps.Connected
		if isWriter {
			st.Peers = append(st.Peers, ps)
		}
	}
	if links > 0 {
		st.PeerConnected = connected
		st.Drained = drained
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
	it := v.dirty().Iterator()
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

// addCopy sums the copy c into the total t (the pair-level Copy of a
// writer with several members: running if any runs, bytes summed, the
// earliest start; rate and ETA from the sums).
func addCopy(t *CopyStatus, c CopyStatus) {
	if !c.Running && !t.Running && t.TotalBytes == 0 {
		*t = c
		return
	}
	if !c.Running {
		return
	}
	if !t.Running {
		*t = CopyStatus{}
	}
	t.Running = true
	t.TotalBytes += c.TotalBytes
	t.DoneBytes += c.DoneBytes
	t.BytesPerSecond += c.BytesPerSecond
	if t.StartTime.IsZero() || c.StartTime.Before(t.StartTime) {
		t.StartTime = c.StartTime
	}
	t.FullCopy = t.FullCopy || c.FullCopy
	if c.Reason != "" && t.Reason == "" {
		t.Reason = c.Reason
	}
	t.ETASeconds = 0
	if t.BytesPerSecond > 0 {
		t.ETASeconds = (t.TotalBytes - t.DoneBytes) / t.BytesPerSecond
	}
}
