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
	"k8s.io/utils/clock"

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
	// Size and RegionSize of the volume (an existing replica smaller than
	// Size grows to it, see Grow; a larger one is refused, ErrShrink);
	// ExtentSize of write-intent extents
	// (0: the extent size of the journal on disk, which a grown volume
	// keeps, or for a new journal bitmap.ExtentSizeFor, 4 MiB or the region
	// size if larger, larger for a volume of more than 2^26 such extents).
	Size, RegionSize, ExtentSize int64
	// Store overrides the backing file (a block device, or a fault injector).
	Store store.Store
	// Authority gates writes; nil means AlwaysAuthorized.
	Authority Authority
	// Dial connects to the peer's replication listener; nil uses net.Dialer.
	Dial DialFunc
	// Token is the token that authenticates this agent to the peer's
	// replication listener, asked for at every connection (it may be
	// rotated while the volume is open); nil: none.
	Token func() string
	// PayloadChecksums asks for a CRC-32C over every replicated payload on
	// the links this replica is in, sent and verified on top of TCP's
	// checksum. Off (the default), the data frames carry a checksum of
	// their header only when the peer agrees (repl: Payload checksums).
	PayloadChecksums bool
	// CheckpointInterval is how often the bitmap is checkpointed (0: 5 s).
	CheckpointInterval time.Duration
	// CloseTimeout bounds how long Close waits for the client writes already
	// admitted to finish (0: 5 s).
	CloseTimeout time.Duration
	// Budget is the agent's in-flight memory budget: the payloads of the
	// requests the peer forwards to this member are charged to it. Nil:
	// unbounded.
	Budget *budget.Budget
	// Clock is what the volume reads and reports time by (nil:
	// clock.RealClock{}): failback hold durations, the oldest-unreplicated
	// age, the copy's start, rate and ETA, the last error's time, the
	// metadata's UpdatedAt, and the checkpoint ticker. Waits that bound a
	// network or disk operation (deadlines, backoffs, Close's timeout) run on
	// real time whatever it is, so a stopped fake clock cannot hang them.
	Clock clock.WithTicker
	Log   logr.Logger
}

// Volume is one replica and its replication engine.
type Volume struct {
	opts    Options
	log     logr.Logger
	store   store.Store
	journal *bitmap.Journal
	auth    Authority
	locks   regionLocks

	// fanMu orders the client writes and copies queued on several links
	// (a writer with several backups), gseq numbers the writes
	// (watermark.go). Lock order: region locks, fanMu, a link's mu.
	fanMu sync.Mutex
	gseq  atomic.Uint64

	// ckpt orders checkpoints against writes between journal Mark and the
	// tracker bit being set (see checkpoint).
	ckpt sync.RWMutex

	// applyMu serialises Apply and the attaching of a backup stream
	// (ServePrimary). Lock order: applyMu, then a stream's emu, then mu.
	applyMu sync.Mutex

	// size is the volume's size in bytes (Grow raises it once the
	// metadata records it); growMu serialises Grow. growTestHook, if set
	// (tests), runs after each step of Grow.
	size         atomic.Int64
	growMu       sync.Mutex
	growTestHook func(step string) error

	mu        sync.Mutex
	spec      Spec
	role      Role
	epoch     uint64
	dataState DataState
	// Identity (invariant 8, docs/architecture.md): joined says the replica holds the
	// data of the pair pairUID ("" for a replica of a version 1 metadata
	// file, which adopts the first UID it is given); zero that the store
	// holds only zeros (created so, never written); dataReason why the
	// data state is what it is, for the status.
	joined      bool
	pairUID     string
	zero        atomic.Bool
	dataReason  string
	bitmapsLost bool
	// tracked are the members recorded in the metadata (its peer, then
	// otherPeers): those whose differences from this replica its bitmaps
	// track, one tracker each (trackers; under "" while none is tracked,
	// see peers.go). Loaded at Open (the baseline the first Apply compares
	// against, as v.spec is empty then) and replaced by every Apply that
	// names other members; a spec without members keeps them. Empty for a
	// new replica, or one whose metadata never recorded a peer.
	tracked  []string
	trackers map[string]*bitmap.Tracker
	// changedPeers holds the tracked members whose differences the bitmaps do
	// not describe, because they replaced a member the bitmaps tracked
	// (meta.Meta.PeerChanged and OtherPeersChanged, kept in every metadata
	// write). The next resync with such a member copies the whole volume,
	// whichever side this replica is on: as the writer it copies
	// everything (fullCopyReason), as the backup its HelloAck asks for it
	// (FullCopy). The value is the change's number (peerGen counts them),
	// so that a link or stream that read the flag clears it only if no
	// newer change happened meanwhile.
	changedPeers map[string]uint64
	peerGen      uint64
	// peers are the members of the current spec, with their trackers and,
	// on the writer, links (peers.go). Replaced as a whole by Apply.
	peers []*peer
	// unmerged are the regions a resync left different on the two members
	// because this member's own diff was not merged (mergePrimaryBitmap
	// false, the method's second embodiment); kept in the file "unmerged"
	// and shrunk as frames covering a whole region arrive.
	unmerged      *roaring.Bitmap
	unmergedDirty bool              // the file lags the set (only shrunk since)
	unmergedN     atomic.Uint64     // its size, read without v.mu on the write path
	alone         map[string]uint64 // member -> the epoch the controller recorded it Outdated at
	changed       chan struct{}
	inflight      int64 // admitted client writes not yet finished
	holdStart     time.Time
	lastHold      time.Duration
	lastErr       string
	lastErrTime   time.Time
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

// Open opens or creates the replica in opts.Dir; a replica whose metadata
// records a smaller size than opts.Size is opened at its own size and
// grown (Grow) before Open returns. The volume starts fenced
// (RoleNone): it accepts no writes and no replication until Apply gives it a
// role and an epoch. A replica whose store this call created all-zero is
// UpToDate with an empty bitmap (a brand-new pair needs no initial copy).
func Open(opts Options) (*Volume, error) {
	if opts.ExtentSize == 0 {
		// A journal keeps the extent size it was created with when its
		// volume grows (Grow): use it, or the default for the size.
		opts.ExtentSize = bitmap.ExtentSizeFor(opts.Size, opts.RegionSize)
		if es, ok := bitmap.StoredExtentSize(filepath.Join(opts.Dir, "bitmap")); ok && es != opts.ExtentSize &&
			bitmap.ValidateGeometry(opts.Size, opts.RegionSize, es) == nil {
			opts.ExtentSize = es
		}
	}
	if opts.CheckpointInterval == 0 {
		opts.CheckpointInterval = 5 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
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
		opts:         opts,
		log:          log,
		auth:         opts.Authority,
		role:         RoleNone,
		alone:        map[string]uint64{},
		changedPeers: map[string]uint64{},
		changed:      make(chan struct{}),
		stop:         make(chan struct{}),
	}
	v.locks.init(opts.RegionSize)
	v.trackers = map[string]*bitmap.Tracker{}

	// growTo is the size a replica smaller than opts.Size grows to once
	// open at its own size (Grow).
	var growTo int64
	m, err := meta.Read(opts.Dir)
	switch {
	case err == nil:
		if m.RegionSize != opts.RegionSize {
			return nil, fmt.Errorf("volume %s: replica in %s has size %d and region size %d, want %d and %d",
				opts.Name, opts.Dir, m.Size, m.RegionSize, opts.Size, opts.RegionSize)
		}
		if m.Size > opts.Size {
			return nil, fmt.Errorf("volume %s: replica in %s has size %d, larger than the %d asked: %w",
				opts.Name, opts.Dir, m.Size, opts.Size, ErrShrink)
		}
		if m.Size < opts.Size {
			growTo, opts.Size = opts.Size, m.Size
		}
		v.epoch, v.dataState = m.Epoch, DataState(m.DataState)
		v.joined, v.pairUID = m.Joined, m.PairUID
		v.zero.Store(m.Zero)
		if m.Peer != "" {
			v.tracked = append([]string{m.Peer}, m.OtherPeers...)
			if m.PeerChanged {
				v.peerGen++
				v.changedPeers[m.Peer] = v.peerGen
			}
			for _, n := range m.OtherPeersChanged {
				v.peerGen++
				v.changedPeers[n] = v.peerGen
			}
		}
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
	v.size.Store(opts.Size)

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
		v.unmerged.AddRange(0, uint64(v.regions()))
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
	// One tracker per tracked member, each from the recovered union (see
	// peers.go).
	names := v.tracked
	if len(names) == 0 {
		names = []string{""}
	}
	for _, n := range names {
		t := v.newTracker()
		if recovered != nil && !recovered.IsEmpty() {
			t.MarkRegions(recovered)
		}
		if v.bitmapsLost {
			all := roaring.New()
			all.AddRange(0, uint64(v.regions()))
			t.MarkRegions(all)
		}
		v.trackers[n] = t
	}
	v.peers = v.peersLocked(Spec{Mode: ModeAsync}, nil)
	if err := v.persistLocked(); err != nil {
		v.journal.Close(v.dirty())
		st.Close()
		return nil, err
	}
	log.Info("Opened replica", "dir", opts.Dir, "epoch", v.epoch, "dataState", v.dataState,
		"recoveredDirtyRegions", v.dirtyCount(), "bitmapsLost", v.bitmapsLost, "peers", v.tracked, "changedPeers", len(v.changedPeers))
	v.wg.Add(2)
	go v.checkpointLoop()
	go v.watermarkLoop()
	if growTo > 0 {
		if err := v.Grow(growTo); err != nil {
			v.Close()
			return nil, err
		}
	}
	return v, nil
}

// Name is "<namespace>/<name>".
func (v *Volume) Name() string { return v.opts.Name }

// Size is the volume size in bytes; Grow raises it.
func (v *Volume) Size() int64 { return v.size.Load() }

// token is the replication token to present now ("" none).
func (o *Options) token() string {
	if o.Token == nil {
		return ""
	}
	return o.Token()
}

// StorePath is the backing file (empty when a custom Store is used).
func (v *Volume) StorePath() string {
	if v.opts.Store != nil {
		return ""
	}
	return filepath.Join(v.opts.Dir, "data")
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
	v.lastErr, v.lastErrTime = err.Error(), v.opts.Clock.Now()
	v.mu.Unlock()
}

// checkpointLoop writes the bitmap to disk periodically.
func (v *Volume) checkpointLoop() {
	defer v.wg.Done()
	t := v.opts.Clock.NewTicker(v.opts.CheckpointInterval)
	defer t.Stop()
	var lastStats bitmap.JournalStats
	lastCount := uint64(0)
	for {
		select {
		case <-v.stop:
			return
		case <-t.C():
			st := v.journal.Stats()
			cnt := v.dirtyCount()
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
	snap := v.dirty()
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
	ps, b := v.peers, v.backupConn
	v.peers = withoutLinks(ps)
	v.backupConn = nil
	v.notifyLocked()
	v.mu.Unlock()
	for _, p := range ps {
		if p.link != nil {
			// Frames not acknowledged yet stay dirty (PeerLost).
			p.link.stop()
		}
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
		final = v.dirty()
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
