package volume

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/budget"
	"github.com/tandem-storage/tandem/dataplane/meta"
	"github.com/tandem-storage/tandem/dataplane/store"
)

// Authority tells whether this member may accept writes at an epoch. The
// Kubernetes implementation renews a per-pair Lease and answers false once
// renewal fails (self-fencing); tests use AlwaysAuthorized.
type Authority interface {
	// Authorized returns nil when writes to volume at epoch are allowed, or
	// the reason they are not.
	Authorized(volume string, epoch uint64) error
}

// AlwaysAuthorized is an Authority without a lease: the control API's word is
// final. For tests and single-node use.
type AlwaysAuthorized struct{}

// Authorized always allows.
func (AlwaysAuthorized) Authorized(string, uint64) error { return nil }

// Options configure a Volume.
type Options struct {
	// Name is "<namespace>/<name>".
	Name string
	// Node is this agent's node name.
	Node string
	// Dir holds the replica: "data" (unless Store is set), "meta" and the
	// bitmap journal under "bitmap/".
	Dir string
	// Size and RegionSize of the volume; ExtentSize of write-intent extents
	// (0: 4 MiB).
	Size, RegionSize, ExtentSize int64
	// Store overrides the backing file (a block device, or a fault injector).
	Store store.Store
	// Authority gates writes; nil means AlwaysAuthorized.
	Authority Authority
	// Dial connects to the peer's replication listener; nil uses net.Dialer.
	Dial DialFunc
	// Token authenticates this agent to the peer's replication listener.
	Token string
	// CheckpointInterval is how often the bitmap is checkpointed (0: 5 s).
	CheckpointInterval time.Duration
	// CloseTimeout bounds how long Close waits for the client writes already
	// admitted to finish (0: 5 s).
	CloseTimeout time.Duration
	// Budget is the agent's in-flight memory budget: the payloads of the
	// requests the peer forwards to this member are charged to it. Nil:
	// unbounded.
	Budget *budget.Budget
	Log    logr.Logger
}

// Volume is one replica and its replication engine.
type Volume struct {
	opts    Options
	log     logr.Logger
	store   store.Store
	journal *bitmap.Journal
	tracker *bitmap.Tracker
	auth    Authority
	locks   regionLocks

	// ckpt orders checkpoints against writes between journal Mark and the
	// tracker bit being set (see checkpoint).
	ckpt sync.RWMutex

	// applyMu serialises Apply and the attaching of a backup stream
	// (ServePrimary). Lock order: applyMu, then a stream's emu, then mu.
	applyMu sync.Mutex

	mu        sync.Mutex
	spec      Spec
	role      Role
	epoch     uint64
	dataState DataState
	// Identity (DESIGN invariant 8): joined says the replica holds the
	// data of the pair pairUID ("" for a replica of a version 1 metadata
	// file, which adopts the first UID it is given); zero that the store
	// holds only zeros (created so, never written); dataReason why the
	// data state is what it is, for the status.
	joined      bool
	pairUID     string
	zero        atomic.Bool
	dataReason  string
	bitmapsLost bool
	// unmerged are the regions a resync left different on the two members
	// because this member's own diff was not merged (mergePrimaryBitmap
	// false, the method's second embodiment); kept in the file "unmerged"
	// and shrunk as frames covering a whole region arrive.
	unmerged      *roaring.Bitmap
	unmergedDirty bool          // the file lags the set (only shrunk since)
	unmergedN     atomic.Uint64 // its size, read without v.mu on the write path
	aloneEpoch    uint64        // the controller recorded the peer Outdated at this epoch
	changed       chan struct{}
	inflight      int64 // admitted client writes not yet finished
	holdStart     time.Time
	lastHold      time.Duration
	lastErr       string
	lastErrTime   time.Time
	link          *link       // primary side
	backupConn    *backupSide // backup side
	fwd           *forwarder  // ex-writer forwarding to the new writer
	closed        bool

	waitingAlone atomic.Int64
	heldWrites   atomic.Int64
	forwarded    atomic.Int64
	copiedTotal  atomic.Int64
	ctr          counters

	stop chan struct{}
	wg   sync.WaitGroup
}

type counters struct {
	writes, writeBytes, reads, readBytes, flushes   atomic.Int64
	framesSent, framesApplied, reconnects, rejected atomic.Int64
}

// Open opens or creates the replica in opts.Dir. The volume starts fenced
// (RoleNone): it accepts no writes and no replication until Apply gives it a
// role and an epoch. A replica whose store this call created all-zero is
// UpToDate with an empty bitmap (a brand-new pair needs no initial copy).
func Open(opts Options) (*Volume, error) {
	if opts.ExtentSize == 0 {
		opts.ExtentSize = max(4<<20, opts.RegionSize)
	}
	if opts.CheckpointInterval == 0 {
		opts.CheckpointInterval = 5 * time.Second
	}
	if opts.CloseTimeout <= 0 {
		opts.CloseTimeout = 5 * time.Second
	}
	if opts.Authority == nil {
		opts.Authority = AlwaysAuthorized{}
	}
	if err := bitmap.ValidateGeometry(opts.Size, opts.RegionSize, opts.ExtentSize); err != nil {
		return nil, fmt.Errorf("volume %s: %w", opts.Name, err)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("volume %s: %w", opts.Name, err)
	}
	log := opts.Log.WithValues("volume", opts.Name)
	v := &Volume{
		opts:    opts,
		log:     log,
		auth:    opts.Authority,
		tracker: bitmap.NewTracker(opts.Size, opts.RegionSize),
		role:    RoleNone,
		changed: make(chan struct{}),
		stop:    make(chan struct{}),
	}
	v.locks.init(opts.RegionSize)

	m, err := meta.Read(opts.Dir)
	switch {
	case err == nil:
		if m.Size != opts.Size || m.RegionSize != opts.RegionSize {
			return nil, fmt.Errorf("volume %s: replica in %s has size %d and region size %d, want %d and %d",
				opts.Name, opts.Dir, m.Size, m.RegionSize, opts.Size, opts.RegionSize)
		}
		v.epoch, v.dataState = m.Epoch, DataState(m.DataState)
		v.joined, v.pairUID = m.Joined, m.PairUID
		v.zero.Store(m.Zero)
		if !v.joined {
			v.dataReason = reasonNew
		}
	case errors.Is(err, os.ErrNotExist):
		// A new replica, or one whose directory was wiped: it holds no
		// data of any pair until a full copy completes, or until it starts
		// a new pair's data as its first writer (Spec.Initialize).
		v.dataState, v.dataReason = Inconsistent, reasonNew
	case errors.Is(err, meta.ErrCorrupt):
		// Whose data this is, and how far it can be trusted, is unknown:
		// keep the damaged file for a post-mortem and start over as a
		// replica that needs a full copy (never served before it).
		kept := fmt.Sprintf("%s.damaged-%d", meta.FileName, time.Now().UnixNano())
		if rerr := os.Rename(filepath.Join(opts.Dir, meta.FileName), filepath.Join(opts.Dir, kept)); rerr != nil {
			return nil, fmt.Errorf("volume %s: metadata damaged (%v), and moving it aside failed: %w", opts.Name, err, rerr)
		}
		log.Error(err, "Replica metadata damaged; kept it aside, the replica needs a full copy", "keptAs", kept)
		v.dataState = Inconsistent
		v.dataReason = "the replica's metadata was damaged (kept as " + kept + "): a full copy brings the data back"
		v.bitmapsLost = true
	default:
		return nil, fmt.Errorf("volume %s: reading metadata: %w", opts.Name, err)
	}
	freshMeta := err != nil

	st := opts.Store
	if st == nil {
		path := filepath.Join(opts.Dir, "data")
		_, statErr := os.Stat(path)
		created := errors.Is(statErr, os.ErrNotExist)
		st, err = store.OpenFile(path, opts.Size, created)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", opts.Name, err)
		}
		if created && !freshMeta {
			// The metadata survived but the data did not: nothing in it can
			// be trusted and the peer must copy everything.
			v.dataState, v.dataReason = Inconsistent, reasonDataLost
			v.joined = false
			v.bitmapsLost = true
		}
		if created {
			v.zero.Store(true)
		}
	} else if freshMeta && store.AllZero(st) {
		v.zero.Store(true)
	}
	v.store = st

	v.unmerged, err = bitmap.ReadRegionSet(filepath.Join(opts.Dir, unmergedFile), opts.Size, opts.RegionSize)
	if err != nil {
		// Which regions differ is lost: say all of them may.
		log.Error(err, "Unmerged regions lost; reporting every region as possibly different")
		v.unmerged = roaring.New()
		v.unmerged.AddRange(0, uint64(v.tracker.Regions()))
	}
	v.unmergedN.Store(v.unmerged.GetCardinality())

	j, recovered, err := bitmap.OpenJournal(filepath.Join(opts.Dir, "bitmap"), opts.Size, opts.RegionSize, opts.ExtentSize, log.WithName("journal"))
	if errors.Is(err, bitmap.ErrCorrupt) || errors.Is(err, bitmap.ErrGeometry) {
		log.Error(err, "Bitmap journal lost; the whole volume counts as out of sync")
		if rerr := bitmap.ResetJournal(filepath.Join(opts.Dir, "bitmap")); rerr != nil {
			st.Close()
			return nil, fmt.Errorf("volume %s: resetting bitmap journal: %w", opts.Name, rerr)
		}
		j, _, err = bitmap.OpenJournal(filepath.Join(opts.Dir, "bitmap"), opts.Size, opts.RegionSize, opts.ExtentSize, log.WithName("journal"))
		v.bitmapsLost = true
	}
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("volume %s: %w", opts.Name, err)
	}
	v.journal = j
	// Extents that keep being written stay marked across checkpoints: no
	// group commit (fdatasync) on the write path after each checkpoint.
	j.KeepHot(true)
	if recovered != nil && !recovered.IsEmpty() {
		v.tracker.MarkRegions(recovered)
	}
	if v.bitmapsLost {
		all := roaring.New()
		all.AddRange(0, uint64(v.tracker.Regions()))
		v.tracker.MarkRegions(all)
	}
	if err := v.persistLocked(); err != nil {
		v.journal.Close(v.tracker.Dirty())
		st.Close()
		return nil, err
	}
	log.Info("Opened replica", "dir", opts.Dir, "epoch", v.epoch, "dataState", v.dataState,
		"recoveredDirtyRegions", v.tracker.Count(), "bitmapsLost", v.bitmapsLost)
	v.wg.Add(1)
	go v.checkpointLoop()
	return v, nil
}

// Name is "<namespace>/<name>".
func (v *Volume) Name() string { return v.opts.Name }

// Size is the volume size in bytes.
func (v *Volume) Size() int64 { return v.opts.Size }

// StorePath is the backing file (empty when a custom Store is used).
func (v *Volume) StorePath() string {
	if v.opts.Store != nil {
		return ""
	}
	return filepath.Join(v.opts.Dir, "data")
}

// persistLocked writes the metadata; v.mu held (or not yet shared).
func (v *Volume) persistLocked() error {
	return v.writeMeta(v.metaLocked())
}

// metaLocked is the metadata of the replica's current state; v.mu held.
func (v *Volume) metaLocked() meta.Meta {
	return meta.Meta{
		Volume: v.opts.Name, Size: v.opts.Size, RegionSize: v.opts.RegionSize,
		Epoch: v.epoch, Role: string(v.role), DataState: string(v.dataState),
		Peer: v.spec.PeerNode, Joined: v.joined, PairUID: v.pairUID, Zero: v.zero.Load(), UpdatedAt: time.Now(),
	}
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
// once a copy from a member holding the pair's data has completed.
func (v *Volume) completeCopy(uid string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.dataState == UpToDate && v.holdsLocked(uid) && (v.pairUID == uid) {
		return nil
	}
	m := v.metaLocked()
	m.DataState, m.Joined, m.PairUID = string(UpToDate), true, uid
	if err := v.writeMeta(m); err != nil {
		return err
	}
	old := v.dataState
	joined := v.joined
	v.dataState, v.joined, v.pairUID, v.dataReason = UpToDate, true, uid, ""
	v.log.Info("Data state changed", "from", old, "to", UpToDate, "joinedPair", !joined)
	v.notifyLocked()
	return nil
}

// notifyLocked wakes everyone waiting for a state change; v.mu held.
func (v *Volume) notifyLocked() {
	close(v.changed)
	v.changed = make(chan struct{})
}

func (v *Volume) notify() {
	v.mu.Lock()
	v.notifyLocked()
	v.mu.Unlock()
}

func (v *Volume) setError(err error) {
	v.mu.Lock()
	v.lastErr, v.lastErrTime = err.Error(), time.Now()
	v.mu.Unlock()
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
	v.applyMu.Lock()
	defer v.applyMu.Unlock()
	v.mu.Lock()
	if err := v.refuseLocked(s); err != nil {
		v.mu.Unlock()
		return err
	}
	// A change of role or epoch first stops the stream from the old
	// primary and waits for the frame it is applying: nothing that primary
	// sent may land once this member plays its new part (invariant 1).
	if b := v.backupConn; b != nil && (b.epoch != s.Epoch || s.Role != RoleBackup) {
		v.backupConn = nil
		v.mu.Unlock()
		b.stop(errors.New("role or epoch changed"))
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
	m := v.metaLocked()
	idChange := v.identityLocked(s, &m)
	if roleChanged || old.PeerNode != s.PeerNode || idChange != "" {
		// Durable first: after a crash the replica must not come back
		// at an older epoch than one it acted on, nor with another
		// identity.
		m.Role, m.Epoch, m.Peer = string(s.Role), s.Epoch, s.PeerNode
		if err := v.writeMeta(m); err != nil {
			v.mu.Unlock()
			return err
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
		v.holdStart = time.Now()
	case !(s.Hold && s.Role == RolePrimary) && !v.holdStart.IsZero():
		v.lastHold = time.Since(v.holdStart)
		v.holdStart = time.Time{}
		v.log.Info("Write hold released", "heldFor", v.lastHold.String())
	}

	linkChanged := roleChanged || old.PeerAddress != s.PeerAddress || old.Mode != s.Mode
	var stopLink *link
	if linkChanged && v.link != nil {
		stopLink, v.link = v.link, nil
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
	if s.Role == RolePrimary && s.PeerAddress != "" && v.link == nil {
		v.link = newLink(v, s)
		v.link.start()
	}
	if s.Role == RoleBackup && oldRole == RolePrimary {
		v.fwd = newForwarder(v)
	}
	if s.Role == RolePrimary {
		v.fwd = nil
	}
	v.notifyLocked()
	v.mu.Unlock()

	if stopLink != nil {
		stopLink.stop()
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

// unmergedFile holds the unmerged regions (bitmap.WriteRegionSet).
const unmergedFile = "unmerged"

// keepUnmerged adds the regions of own, this member's diff that the primary
// did not merge into a resync, to the unmerged set, durably: they differ
// from the primary's and will not be copied.
func (v *Volume) keepUnmerged(own *roaring.Bitmap) error {
	if own.IsEmpty() {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	next := roaring.Or(v.unmerged, own)
	if err := bitmap.WriteRegionSet(filepath.Join(v.opts.Dir, unmergedFile), v.opts.Size, v.opts.RegionSize, next); err != nil {
		return fmt.Errorf("volume %s: recording unmerged regions: %w", v.opts.Name, err)
	}
	v.unmerged, v.unmergedDirty = next, false
	v.unmergedN.Store(next.GetCardinality())
	v.log.Info("Own diff not merged by the primary (mergePrimaryBitmap false); regions left different", "regions", own.GetCardinality(), "unmergedTotal", next.GetCardinality())
	return nil
}

// coveredUnmerged drops from the unmerged set the regions that
// [off, off+n) covers whole: the frame that wrote them made both members
// hold the same bytes there. The file is rewritten lazily (at the next
// checkpoint); a crash before that over-reports, never under-reports.
func (v *Volume) coveredUnmerged(off, n int64) {
	rs := v.opts.RegionSize
	first := (off + rs - 1) / rs
	end := (off + n) / rs
	if off+n >= v.opts.Size {
		end = int64(v.tracker.Regions())
	}
	if end <= first || v.unmergedN.Load() == 0 {
		return
	}
	v.mu.Lock()
	if v.unmerged.IntersectsWithInterval(uint64(first), uint64(end)) {
		v.unmerged.RemoveRange(uint64(first), uint64(end))
		v.unmergedDirty = true
		v.unmergedN.Store(v.unmerged.GetCardinality())
	}
	v.mu.Unlock()
}

// clearUnmerged forgets every unmerged region (a full copy overwrote them).
func (v *Volume) clearUnmerged() {
	v.mu.Lock()
	if !v.unmerged.IsEmpty() {
		v.unmerged.Clear()
		v.unmergedDirty = true
		v.unmergedN.Store(0)
	}
	v.mu.Unlock()
}

// flushUnmerged rewrites the unmerged file if it lags the set.
func (v *Volume) flushUnmerged() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.unmergedDirty {
		return nil
	}
	if err := bitmap.WriteRegionSet(filepath.Join(v.opts.Dir, unmergedFile), v.opts.Size, v.opts.RegionSize, v.unmerged); err != nil {
		return fmt.Errorf("volume %s: recording unmerged regions: %w", v.opts.Name, err)
	}
	v.unmergedDirty = false
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

// PeerOutdated records that the controller has marked the peer Outdated in
// the API server at epoch: sync writes held because the peer is unreachable
// may now be acknowledged with only the local copy (invariant 2).
func (v *Volume) PeerOutdated(epoch uint64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if epoch != v.epoch {
		return fmt.Errorf("volume %s: peer-outdated for epoch %d, but the replica is at epoch %d", v.opts.Name, epoch, v.epoch)
	}
	if v.aloneEpoch != epoch {
		v.aloneEpoch = epoch
		v.log.Info("Peer recorded Outdated; continuing alone", "epoch", epoch)
		v.notifyLocked()
	}
	return nil
}

// clearAlone forgets the controller's Outdated record of the peer once the
// peer is back in sync (invariant 2 holds afresh for the next loss).
func (v *Volume) clearAlone() {
	v.mu.Lock()
	v.aloneEpoch = 0
	v.mu.Unlock()
}

// Spec returns the desired state last applied.
func (v *Volume) Spec() Spec {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.spec
}

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
		st.HoldSeconds = time.Since(v.holdStart).Seconds()
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

// checkpointLoop writes the bitmap to disk periodically.
func (v *Volume) checkpointLoop() {
	defer v.wg.Done()
	t := time.NewTicker(v.opts.CheckpointInterval)
	defer t.Stop()
	var lastStats bitmap.JournalStats
	lastCount := uint64(0)
	for {
		select {
		case <-v.stop:
			return
		case <-t.C:
			st := v.journal.Stats()
			cnt := v.tracker.Count()
			// Idle: checkpoint until no extent is marked or covered in full
			// any more, so that recovery after a crash reports the tracker's
			// bitmap exactly. A failed journal is never idle: a checkpoint
			// opens a new log, which recovers it without waiting for a write.
			if st == lastStats && cnt == lastCount && st.Extents == 0 && st.RetiredExtents == 0 && v.journal.Err() == nil {
				continue
			}
			if err := v.checkpoint(); err != nil {
				v.log.Error(err, "Bitmap checkpoint failed")
				v.setError(err)
			}
			lastStats, lastCount = v.journal.Stats(), cnt
		}
	}
}

// checkpoint writes the tracker's bitmap. Writes hold v.ckpt for reading
// from their journal Mark until their tracker bit is set, so the snapshot
// covers every write whose Mark happened in an earlier journal generation.
func (v *Volume) checkpoint() error {
	v.ckpt.Lock()
	snap := v.tracker.Dirty()
	v.ckpt.Unlock()
	if err := v.flushUnmerged(); err != nil {
		return err
	}
	return v.journal.Checkpoint(snap)
}

// Close refuses new client writes, waits (up to Options.CloseTimeout) for the
// admitted ones to finish, stops replication and writes a final checkpoint
// of the bitmap, so that after a restart every region that may differ from
// the peer is dirty (invariant 3): writes the peer acknowledged are clean,
// writes queued or in flight to it are dirty. If writes are still running
// after that (a stalled disk), it logs an error and leaves the
// write-intent journal as it is instead of a final checkpoint that could
// miss them: the next Open recovers the last checkpoint plus every extent
// marked since, which covers them.
func (v *Volume) Close() error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return nil
	}
	v.closed = true // writableLocked refuses new writes from now on
	v.notifyLocked()
	timeout := time.NewTimer(v.opts.CloseTimeout)
	defer timeout.Stop()
	expired := false
	for v.inflight > 0 && !expired {
		ch := v.changed
		v.mu.Unlock()
		select {
		case <-ch:
		case <-timeout.C:
			expired = true
		}
		v.mu.Lock()
	}
	stuck := v.inflight
	l, b := v.link, v.backupConn
	v.link, v.backupConn = nil, nil
	v.notifyLocked()
	v.mu.Unlock()
	if l != nil {
		// Frames not acknowledged yet stay dirty (PeerLost).
		l.stop()
	}
	if b != nil {
		// Once stopped, no frame of the stream touches the store; a frame
		// stuck in a stalled store is not waited for past the timeout.
		stopped := make(chan struct{})
		go func() { b.stop(ErrClosed); close(stopped) }()
		if !expired {
			select {
			case <-stopped:
			case <-timeout.C:
			}
		}
	}
	close(v.stop)
	loopDone := make(chan struct{})
	go func() { v.wg.Wait(); close(loopDone) }()
	if stuck == 0 {
		<-loopDone
	} else {
		// A checkpoint due now waits (v.ckpt) for the stuck writes; the
		// journal refuses it once closed.
		select {
		case <-loopDone:
		case <-time.After(time.Second):
		}
	}
	var errs []error
	if err := v.store.Sync(); err != nil {
		errs = append(errs, err)
	}
	if err := v.flushUnmerged(); err != nil {
		errs = append(errs, err)
	}
	var final *roaring.Bitmap
	if stuck == 0 {
		// No write between its journal mark and its tracker bit: the
		// tracker covers every write (see checkpoint).
		v.ckpt.Lock()
		final = v.tracker.Dirty()
		v.ckpt.Unlock()
	} else {
		err := fmt.Errorf("volume %s: %d client writes still in progress %v after close began; keeping the write-intent journal for recovery instead of a final checkpoint", v.opts.Name, stuck, v.opts.CloseTimeout)
		v.log.Error(err, "Closing with writes in flight")
		errs = append(errs, err)
	}
	if err := v.journal.Close(final); err != nil {
		errs = append(errs, err)
	}
	if err := v.store.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
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
