package volume

import (
	"slices"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Peer is a member a writer mirrors to (agentapi.Peer).
type Peer = agentapi.Peer

// PeerStatus is what a writer reports of one member (agentapi.PeerStatus).
type PeerStatus = agentapi.PeerStatus

// A replica keeps one dirty bitmap (a bitmap.Tracker) per member it
// tracks: the regions where that member may lack what this replica holds.
// The writer marks a write in the tracker of every member it mirrors to,
// and a member's acks clear only its own: each backup lags on its own. The
// write-intent journal is shared, and its checkpoints hold the union of the
// trackers, so after a crash every tracker restarts from that union (it
// over-reports for a member that was ahead of the others, never
// under-reports: invariant 3).
//
// The tracked members are the metadata's peer and otherPeers, in the
// controller's order. A replica that tracks none (new, or from before
// peers were recorded) keeps one tracker under the name "", which the
// first member it is given adopts. A member added to a replica that
// already tracks others gets a tracker holding the union of theirs, and is
// recorded as changed (see Member replacement in the package doc): its
// first resync copies the whole volume.

// peer is one member of the replica's current spec: its name, address and
// mode, its tracker and, on the writer, the link to it. Apply replaces
// v.peers as a whole; a peer is never changed once published.
type peer struct {
	Peer
	// node is Peer.Node, or the tracked member a spec without a node
	// means (resolveLocked): the name its Outdated record is kept under.
	node string
	tr   *bitmap.Tracker
	link *link
}

// regions is the number of regions of the volume.
func (v *Volume) regions() uint32 {
	rs := v.opts.RegionSize
	return uint32((v.size.Load() + rs - 1) / rs)
}

// newTracker is an empty tracker of the volume's geometry.
func (v *Volume) newTracker() *bitmap.Tracker {
	return bitmap.NewTracker(v.size.Load(), v.opts.RegionSize)
}

// resolveLocked names the member a spec that names none means: the one
// tracked member, if there is exactly one. v.mu held.
func (v *Volume) resolveLocked(node string) string {
	if node == "" && len(v.tracked) == 1 {
		return v.tracked[0]
	}
	return node
}

// trackerForLocked is the tracker of member node: its own, or the only
// tracker there is (a replica tracking one member or none, given a spec
// without a node or another member, as before members were named); nil
// when several are tracked and none is node's. v.mu held.
func (v *Volume) trackerForLocked(node string) *bitmap.Tracker {
	if t, ok := v.trackers[v.resolveLocked(node)]; ok {
		return t
	}
	if len(v.trackers) == 1 {
		for _, t := range v.trackers {
			return t
		}
	}
	return nil
}

// trackerList is every tracker, for marking and for the union.
func (v *Volume) trackerList() []*bitmap.Tracker {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.trackerListLocked()
}

func (v *Volume) trackerListLocked() []*bitmap.Tracker {
	out := make([]*bitmap.Tracker, 0, len(v.trackers))
	for _, t := range v.trackers {
		out = append(out, t)
	}
	return out
}

// dirty is the union of every tracker's dirty regions: what some member
// may lack. Checkpoints write it; a backup's status reports it.
func (v *Volume) dirty() *roaring.Bitmap {
	ts := v.trackerList()
	if len(ts) == 1 {
		return ts[0].Dirty()
	}
	u := roaring.New()
	for _, t := range ts {
		u.Or(t.Dirty())
	}
	return u
}

// dirtyCount is the number of regions in dirty().
func (v *Volume) dirtyCount() uint64 {
	ts := v.trackerList()
	if len(ts) == 1 {
		return ts[0].Count()
	}
	return v.dirty().GetCardinality()
}

// markAllHoled marks [off, off+n) for a resync to every member, which
// differs there in a way no write number says (a torn local write, a
// repair): their watermarks stop until the resync (watermark.go). The
// marks come first, so a resync completing meanwhile sees them.
func (v *Volume) markAllHoled(off, n int64) {
	for _, t := range v.trackerList() {
		t.MarkRange(off, n)
	}
	v.mu.Lock()
	ps := v.peers
	v.mu.Unlock()
	for _, p := range ps {
		if p.link != nil {
			p.link.mu.Lock()
			p.link.holeLocked(0)
			p.link.mu.Unlock()
		}
	}
}

// setTrackedLocked makes nodes (non-empty, distinct) the tracked members,
// into m (the metadata to persist first) and, with commit, into the
// volume: members not tracked before are changed when others were; members
// no longer named lose their tracker (named again later, they are changed).
// It reports whether anything changed. v.mu held.
func (v *Volume) setTrackedLocked(nodes []string, commit bool) (changed bool, added []string) {
	if len(nodes) == 0 || slices.Equal(nodes, v.tracked) {
		return false, nil
	}
	for _, n := range nodes {
		if !slices.Contains(v.tracked, n) {
			added = append(added, n)
		}
	}
	if !commit {
		return true, added
	}
	old := v.trackers
	union := func() *roaring.Bitmap {
		u := roaring.New()
		for _, t := range old {
			u.Or(t.Dirty())
		}
		return u
	}
	base, adopt := old[""]
	hadMembers := len(v.tracked) > 0
	trackers := make(map[string]*bitmap.Tracker, len(nodes))
	keep := make(map[string]uint64)
	for _, n := range nodes {
		if t, ok := old[n]; ok {
			trackers[n] = t
			if g, ok := v.changedPeers[n]; ok {
				keep[n] = g
			}
			continue
		}
		switch {
		case adopt && !hadMembers:
			// A replica that tracked nobody: its one tracker (the
			// recovered bitmap) is about this member from now on.
			trackers[n], adopt = base, false
		default:
			t := v.newTracker()
			t.MarkRegions(union())
			trackers[n] = t
		}
		if hadMembers {
			v.peerGen++
			keep[n] = v.peerGen
		}
	}
	v.trackers, v.changedPeers, v.tracked = trackers, keep, slices.Clone(nodes)
	return true, added
}

// peersLocked builds the peers of spec s from the tracked members (with
// their trackers), reusing the links in reuse (by node) it keeps and
// creating the others on the writer. v.mu held.
func (v *Volume) peersLocked(s Spec, reuse map[string]*link) []*peer {
	var out []*peer
	ps := s.Peers()
	if len(ps) == 0 {
		// A spec without members keeps tracking the known ones.
		names := v.tracked
		if len(names) == 0 {
			names = []string{""}
		}
		for _, n := range names {
			ps = append(ps, Peer{Node: n, Mode: s.Mode})
		}
	}
	for _, p := range ps {
		np := &peer{Peer: p, node: v.resolveLocked(p.Node), tr: v.trackerForLocked(p.Node)}
		if np.tr == nil {
			// Unreachable with validated specs (every member is named
			// once several are tracked); a fresh all-dirty tracker keeps
			// the member from being trusted.
			np.tr = v.newTracker()
			all := roaring.New()
			all.AddRange(0, uint64(v.regions()))
			np.tr.MarkRegions(all)
		}
		if s.Role == RolePrimary && p.Address != "" {
			if l := reuse[p.Node]; l != nil && l.tr == np.tr {
				np.link = l
				delete(reuse, p.Node)
			} else {
				np.link = newLink(v, s, np)
			}
		}
		out = append(out, np)
	}
	multi := multiLinks(out) != nil
	for _, p := range out {
		if p.link != nil {
			p.link.multi.Store(multi)
		}
	}
	return out
}

// peerForLocked is the current peer named node (resolved), or nil; v.mu
// held.
func (v *Volume) peerForLocked(node string) *peer {
	for _, p := range v.peers {
		if p.node == node {
			return p
		}
	}
	return nil
}

// withoutLinks is ps with no links (the links are stopped by the caller).
func withoutLinks(ps []*peer) []*peer {
	out := make([]*peer, len(ps))
	for i, p := range ps {
		out[i] = &peer{Peer: p.Peer, node: p.node, tr: p.tr}
	}
	return out
}

// regionBytes is the number of bytes the regions of b cover (the last
// region of the volume may be short).
func (v *Volume) regionBytes(b *roaring.Bitmap) int64 {
	n := int64(b.GetCardinality()) * v.opts.RegionSize
	if last := v.regions() - 1; b.Contains(last) {
		n -= int64(v.regions())*v.opts.RegionSize - v.size.Load()
	}
	return n
}
