package volume

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/tandem-storage/tandem/dataplane/meta"
)

// persistLocked writes the metadata; v.mu held (or not yet shared).
func (v *Volume) persistLocked() error {
	return v.writeMeta(v.metaLocked())
}

// metaLocked is the metadata of the replica's current state; v.mu held.
// Every metadata write starts from it, so none drops the peer the bitmaps
// track or its PeerChanged flag: only Apply (a new peer) sets the flag, and
// only clearPeerChanged and completeCopy clear it.
func (v *Volume) metaLocked() meta.Meta {
	m := meta.Meta{
		Volume: v.opts.Name, Size: v.size.Load(), RegionSize: v.opts.RegionSize,
		Epoch: v.epoch, Role: string(v.role), DataState: string(v.dataState),
		Joined: v.joined, PairUID: v.pairUID, Zero: v.zero.Load(),
		UpdatedAt: v.opts.Clock.Now(),
	}
	setMetaPeers(&m, v.tracked, v.changedPeers)
	return m
}

// setMetaPeers records the tracked members and which of them changed in m.
func setMetaPeers(m *meta.Meta, tracked []string, changed map[string]uint64) {
	m.Peer, m.PeerChanged, m.OtherPeers, m.OtherPeersChanged = "", false, nil, nil
	if len(tracked) == 0 {
		return
	}
	m.Peer = tracked[0]
	_, m.PeerChanged = changed[tracked[0]]
	for _, n := range tracked[1:] {
		m.OtherPeers = append(m.OtherPeers, n)
		if _, ok := changed[n]; ok {
			m.OtherPeersChanged = append(m.OtherPeersChanged, n)
		}
	}
}

// peerChangedState returns whether the bitmaps do not describe member
// node (changed), the change it stems from (for clearPeerChanged) and the
// members the bitmaps track.
func (v *Volume) peerChangedState(node string) (changed bool, gen uint64, tracked []string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	gen, changed = v.changedPeers[v.resolveLocked(node)]
	return changed, gen, slices.Clone(v.tracked)
}

// clearPeerChanged durably clears member node's changed flag once the
// bitmaps describe the differences to it again (see link.session): unless
// node is not changed, or changed again since the change gen (that change
// needs its own full copy).
func (v *Volume) clearPeerChanged(gen uint64, node, why string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if g, ok := v.changedPeers[node]; !ok || g != gen {
		return nil
	}
	changed := maps.Clone(v.changedPeers)
	delete(changed, node)
	m := v.metaLocked()
	setMetaPeers(&m, v.tracked, changed)
	if err := v.writeMeta(m); err != nil {
		return err
	}
	v.changedPeers = changed
	v.log.Info("Peer change resolved: the bitmaps track the peer again", "peer", node, "how", why)
	return nil
}

// writeMeta replaces the metadata file with m.
func (v *Volume) writeMeta(m meta.Meta) error {
	if err := meta.Write(v.opts.Dir, m); err != nil {
		return fmt.Errorf("volume %s: writing metadata: %w", v.opts.Name, err)
	}
	return nil
}

// clearZero records, durably, that the store no longer holds only zeros:
// called before the first write of any kind lands on a zero store (a client
// write, an applied frame), so a crash cannot leave a written replica that
// claims to be all-zero.
func (v *Volume) clearZero() error {
	if !v.zero.Load() {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.zero.Load() {
		return nil
	}
	m := v.metaLocked()
	m.Zero = false
	if err := v.writeMeta(m); err != nil {
		return err
	}
	v.zero.Store(false)
	return nil
}

// completeCopy makes the replica UpToDate and joined to pair uid, durably,
// once a copy from a member holding the pair's data has completed. With
// full set the copy, from node primary, was of the whole volume: it also
// clears the peerChanged flag in the same write, unless primary is not the
// peer the flag is about or the peer changed again since the change
// peerGen (the one the stream's HelloAck answered).
func (v *Volume) completeCopy(uid string, full bool, primary string, peerGen uint64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	g, isChanged := v.changedPeers[primary]
	clearPeer := full && isChanged && g == peerGen
	joins := !(v.dataState == UpToDate && v.holdsLocked(uid) && (v.pairUID == uid))
	if !joins && !clearPeer {
		return nil
	}
	changed := v.changedPeers
	if clearPeer {
		changed = maps.Clone(v.changedPeers)
		delete(changed, primary)
	}
	m := v.metaLocked()
	m.DataState, m.Joined, m.PairUID = string(UpToDate), true, uid
	setMetaPeers(&m, v.tracked, changed)
	if err := v.writeMeta(m); err != nil {
		return err
	}
	old := v.dataState
	joined := v.joined
	v.dataState, v.joined, v.pairUID, v.dataReason = UpToDate, true, uid, ""
	if clearPeer {
		v.changedPeers = changed
		v.log.Info("Peer change resolved: the bitmaps track the peer again", "peer", primary, "how", "received the whole volume")
	}
	if joins {
		v.log.Info("Data state changed", "from", old, "to", UpToDate, "joinedPair", !joined)
	}
	v.notifyLocked()
	return nil
}

// setDataState persists a new data state.
func (v *Volume) setDataState(ds DataState) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.dataState == ds {
		return nil
	}
	old := v.dataState
	v.dataState = ds
	if err := v.persistLocked(); err != nil {
		v.dataState = old
		return err
	}
	v.log.Info("Data state changed", "from", old, "to", ds)
	v.notifyLocked()
	return nil
}

// Apply sets the desired state. It is idempotent: applying the same Spec
// twice changes nothing. Epochs never go backwards.
func (v *Volume) Apply(s Spec) error {
	if s.Mode == "" {
		s.Mode = ModeAsync
	}
	switch s.Role {
	case RolePrimary, RoleBackup, RoleNone:
	default:
		return fmt.Errorf("volume %s: unknown role %q", v.opts.Name, s.Role)
	}
	if s.Mode != ModeSync && s.Mode != ModeAsync {
		return fmt.Errorf("volume %s: unknown mode %q", v.opts.Name, s.Mode)
	}
	if err := s.ValidatePeers(); err != nil {
		return fmt.Errorf("volume %s: %w", v.opts.Name, err)
	}
	v.applyMu.Lock()
	defer v.applyMu.Unlock()
	v.mu.Lock()
	if err := v.refuseLocked(s); err != nil {
		v.mu.Unlock()
		return err
	}
	// A change of role or epoch, or of the primary this member backs up,
	// first stops the stream from the old primary and waits for the frame
	// it is applying: nothing that primary sent may land once this member
	// plays its new part (invariant 1), nor may its CopyDone clear a
	// peerChanged flag set for the new peer.
	if b := v.backupConn; b != nil && (b.epoch != s.Epoch || s.Role != RoleBackup || (s.PeerNode != "" && b.primary != s.PeerNode)) {
		v.backupConn = nil
		v.mu.Unlock()
		b.stop(errors.New("role, epoch or primary changed"))
		v.mu.Lock()
		// The stream's last frame may have changed the data state.
		if err := v.refuseLocked(s); err != nil {
			v.mu.Unlock()
			return err
		}
	}
	old := v.spec
	oldRole, oldEpoch := v.role, v.epoch
	roleChanged := oldRole != s.Role || oldEpoch != s.Epoch
	// Member replacement: the bitmaps describe the differences to the
	// members they tracked (v.tracked, from the metadata after a restart).
	// Given another member, they mean nothing for it: the next resync with
	// it must copy everything (changed), or a returning member that still
	// holds the pair's data (joined, same pair) would get only the regions
	// written since the replaced member's sync, and stay silently stale. A
	// replica without known members (new, or whose metadata never recorded
	// one) has nothing to invalidate; a spec without members keeps the
	// ones the bitmaps track.
	var nodes []string
	for _, p := range s.Peers() {
		if p.Node != "" {
			nodes = append(nodes, p.Node)
		}
	}
	trackedChange, added := v.setTrackedLocked(nodes, false)
	m := v.metaLocked()
	idChange := v.identityLocked(s, &m)
	if roleChanged || old.PeerNode != s.PeerNode || trackedChange || idChange != "" {
		// Durable first: after a crash the replica must not come back
		// at an older epoch than one it acted on, nor with another
		// identity, nor forget that its bitmaps track a replaced member.
		m.Role, m.Epoch = string(s.Role), s.Epoch
		if trackedChange {
			changed := maps.Clone(v.changedPeers)
			for n := range changed {
				if !slices.Contains(nodes, n) {
					delete(changed, n)
				}
			}
			if len(v.tracked) > 0 {
				for _, n := range added {
					changed[n] = 0
				}
			}
			setMetaPeers(&m, nodes, changed)
		}
		if err := v.writeMeta(m); err != nil {
			v.mu.Unlock()
			return err
		}
	}
	if trackedChange {
		oldTracked := v.tracked
		v.setTrackedLocked(nodes, true)
		if len(oldTracked) > 0 && len(added) > 0 {
			v.log.Info("Peer changed: the next resync copies everything", "old", oldTracked, "new", added)
		}
	}
	if idChange != "" {
		if !v.joined && m.Joined {
			v.dataReason = ""
		} else if !m.Joined {
			v.dataReason = v.identityReasonLocked(s.PairUID)
		}
		v.joined, v.pairUID, v.dataState = m.Joined, m.PairUID, DataState(m.DataState)
		v.log.Info("Replica identity", "change", idChange, "pairUID", s.PairUID, "dataState", v.dataState)
	}
	v.spec, v.role, v.epoch = s, s.Role, s.Epoch

	// Failback hold bookkeeping.
	switch {
	case s.Hold && s.Role == RolePrimary && !old.Hold:
		v.holdStart = v.opts.Clock.Now()
	case !(s.Hold && s.Role == RolePrimary) && !v.holdStart.IsZero():
		v.lastHold = v.opts.Clock.Since(v.holdStart)
		v.holdStart = time.Time{}
		v.log.Info("Write hold released", "heldFor", v.lastHold.String())
	}

	// A link to another member handshakes again (a full copy if the peer
	// changed), even at the same address; so does every link after a
	// change of role or epoch. Links that stay are reused.
	reuse := map[string]*link{}
	for _, p := range v.peers {
		if p.link != nil && !roleChanged && slices.ContainsFunc(s.Peers(), func(q Peer) bool { return q == p.Peer }) {
			reuse[p.Node] = p.link
		}
	}
	oldPeers := v.peers
	v.peers = v.peersLocked(s, reuse)
	var stopLinks, startLinks []*link
	for _, p := range oldPeers {
		if p.link != nil && !slices.ContainsFunc(v.peers, func(q *peer) bool { return q.link == p.link }) {
			stopLinks = append(stopLinks, p.link)
		}
	}
	for _, p := range v.peers {
		if p.link != nil && !slices.ContainsFunc(oldPeers, func(q *peer) bool { return q.link == p.link }) {
			startLinks = append(startLinks, p.link)
		}
	}
	if roleChanged && s.Role == RolePrimary && oldRole != RolePrimary {
		// SWAP: the patent clears the promoted member's bitmap; it records
		// every region written from now on while its peer is away. Regions
		// it still owes a returning peer stay (they are sticky).
		v.log.Info("Promoted to primary", "epoch", s.Epoch, "previousRole", oldRole)
	}
	if roleChanged && oldRole == RolePrimary && s.Role != RolePrimary {
		v.log.Info("Stepped down from primary", "epoch", s.Epoch, "role", s.Role)
	}
	for _, l := range startLinks {
		l.start()
	}
	if s.Role == RoleBackup && oldRole == RolePrimary {
		v.fwd = newForwarder(v)
	}
	if s.Role == RolePrimary {
		v.fwd = nil
	}
	v.notifyLocked()
	v.mu.Unlock()

	for _, l := range stopLinks {
		l.stop()
	}
	if roleChanged {
		v.log.Info("Applied desired state", "role", s.Role, "epoch", s.Epoch, "mode", s.Mode, "peer", s.PeerNode)
	}
	return nil
}

// refuseLocked returns why s cannot be applied now, or nil; v.mu held.
func (v *Volume) refuseLocked(s Spec) error {
	if v.closed {
		return ErrClosed
	}
	if s.Epoch < v.epoch {
		return fmt.Errorf("volume %s: epoch %d is older than the replica's epoch %d", v.opts.Name, s.Epoch, v.epoch)
	}
	if s.Role != RolePrimary || v.role == RolePrimary || s.AllowPromoteInconsistent {
		return nil
	}
	if !v.holdsLocked(s.PairUID) {
		if s.Initialize {
			return nil
		}
		return fmt.Errorf("volume %s: refusing to become primary: data is Inconsistent: %s", v.opts.Name, v.identityReasonLocked(s.PairUID))
	}
	if v.dataState == Inconsistent {
		return fmt.Errorf("volume %s: refusing to become primary: data is Inconsistent (a copy towards this member did not finish)", v.opts.Name)
	}
	return nil
}

// Reasons for a data state, shown in Status.DataStateReason.
const (
	reasonNew      = "new replica: it holds no data of the pair until a full copy completes"
	reasonDataLost = "the replica's data file was missing and was recreated empty: a full copy brings the data back"
	reasonCopying  = "a copy towards this member has not finished"
)

// holdsLocked reports whether the replica holds the data of pair uid; v.mu
// held. A replica joined without a known UID (version 1 metadata) holds
// whatever pair it is given.
func (v *Volume) holdsLocked(uid string) bool {
	return v.joined && (v.pairUID == uid || v.pairUID == "")
}

// identityReasonLocked says why the replica does not hold pair uid's data;
// v.mu held.
func (v *Volume) identityReasonLocked(uid string) string {
	if v.joined {
		return fmt.Sprintf("the replica holds the data of another VolumePair (uid %s), not of uid %s: a full copy replaces it", v.pairUID, uid)
	}
	if v.dataReason != "" {
		return v.dataReason
	}
	return reasonNew
}

// identityLocked brings the replica's identity in line with s before s is
// applied, into m (the metadata to persist): a replica holding another
// pair's data is no longer joined (Inconsistent until a full copy); a
// version 1 replica adopts the pair's UID; Initialize (or the user's
// override) makes this member's data the pair's data. v.mu held. It
// returns what changed, for the log.
func (v *Volume) identityLocked(s Spec, m *meta.Meta) string {
	switch {
	case s.PairUID != "" && v.joined && v.pairUID == "":
		m.PairUID = s.PairUID
		return "adopted the pair's UID"
	case s.PairUID != "" && v.joined && v.pairUID != s.PairUID:
		m.Joined, m.DataState = false, string(Inconsistent)
		if s.Role != RolePrimary || !(s.Initialize || s.AllowPromoteInconsistent) {
			return "holds another VolumePair's data: Inconsistent until a full copy"
		}
	case v.joined:
		return ""
	}
	if s.Role == RolePrimary && (s.Initialize || s.AllowPromoteInconsistent) {
		m.Joined, m.PairUID = true, s.PairUID
		if s.Initialize {
			m.DataState = string(UpToDate)
			return "initialized the pair's data as its first writer"
		}
		return "made the pair's writer by override, data Inconsistent"
	}
	return ""
}

// PeerOutdated records that the controller has marked members Outdated in
// the API server at epoch: the named ones, or with none named every member
// the writer mirrors to. Sync writes held because such a member is
// unreachable may now be acknowledged without it (invariant 2).
func (v *Volume) PeerOutdated(epoch uint64, nodes ...string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if epoch != v.epoch {
		return fmt.Errorf("volume %s: peer-outdated for epoch %d, but the replica is at epoch %d", v.opts.Name, epoch, v.epoch)
	}
	if len(nodes) == 0 {
		for _, p := range v.peers {
			nodes = append(nodes, p.node)
		}
	}
	changed := false
	for _, n := range nodes {
		n = v.resolveLocked(n)
		if v.alone[n] != epoch {
			v.alone[n] = epoch
			changed = true
			v.log.Info("Peer recorded Outdated; continuing without it", "epoch", epoch, "peer", n)
		}
	}
	if changed {
		v.notifyLocked()
	}
	return nil
}

// clearAlone forgets the controller's Outdated record of member node once
// it is back in sync (invariant 2 holds afresh for its next loss).
func (v *Volume) clearAlone(node string) {
	v.mu.Lock()
	delete(v.alone, node)
	v.mu.Unlock()
}

// Spec returns the desired state last applied.
func (v *Volume) Spec() Spec {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.spec
}
