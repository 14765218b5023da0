package bitmap

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// recover reads the checkpoint and the logs it does not cover. It returns the
// recovered regions and the highest log generation present.
func (j *Journal) recover() (*roaring.Bitmap, uint64, error) {
	if err := os.Remove(filepath.Join(j.dir, checkpointTmp)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, 0, fmt.Errorf("removing stale temporary checkpoint: %w", err)
	}
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, 0, fmt.Errorf("listing journal: %w", err)
	}
	var gens []uint64
	for _, e := range entries {
		if gen, ok := parseLogName(e.Name()); ok && e.Type().IsRegular() {
			gens = append(gens, gen)
		}
	}
	slices.Sort(gens)
	var maxGen uint64
	if len(gens) > 0 {
		maxGen = gens[len(gens)-1]
	}

	data, err := os.ReadFile(filepath.Join(j.dir, checkpointName))
	if errors.Is(err, fs.ErrNotExist) {
		// Fresh journal, or a crash during the very first open (before the
		// first checkpoint existed, so before any Mark could have returned).
		for _, gen := range gens {
			lc, err := j.readLog(gen)
			if err != nil && !errors.Is(err, errTornHeader) {
				return nil, 0, err
			}
			if lc.records > 0 {
				return nil, 0, fmt.Errorf("%w: %s has %d records but there is no checkpoint", ErrCorrupt, logName(gen), lc.records)
			}
		}
		j.log.Info("created bitmap journal", "dir", j.dir, "regions", j.geo().regions, "extentSize", j.geo().extentSize)
		return roaring.New(), maxGen, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading checkpoint: %w", err)
	}
	ckGen, bm, err := decodeCheckpoint(data, j.geo())
	if err != nil {
		return nil, 0, err
	}
	fromCheckpoint := bm.GetCardinality()

	// Log ckGen is created (durably) before checkpoint ckGen is written, and
	// logs are created in generation order, so ckGen..maxGen must all exist.
	want := ckGen
	var records, torn int
	for _, gen := range gens {
		if gen < ckGen {
			continue // covered by the checkpoint; removed by the next rotate
		}
		if gen != want {
			return nil, 0, fmt.Errorf("%w: %s missing (checkpoint generation %d, found %s)", ErrCorrupt, logName(want), ckGen, logName(gen))
		}
		want++
		lc, err := j.readLog(gen)
		if errors.Is(err, errTornHeader) && gen == maxGen && gen > ckGen {
			continue // crash while creating the newest log: nothing was marked in it
		}
		if errors.Is(err, errTornHeader) {
			return nil, 0, fmt.Errorf("%w: %w (checkpoint generation %d, newest log %d)", ErrCorrupt, err, ckGen, maxGen)
		}
		if err != nil {
			return nil, 0, err
		}
		for _, r := range lc.runs {
			j.geo().addExtentRegions(r.first, r.first+r.n-1, bm)
		}
		records += lc.records
		torn += lc.torn
	}
	if want == ckGen {
		return nil, 0, fmt.Errorf("%w: %s missing (checkpoint generation %d)", ErrCorrupt, logName(ckGen), ckGen)
	}
	j.log.Info("recovered dirty bitmap", "dir", j.dir, "checkpointGeneration", ckGen, "lastGeneration", maxGen,
		"checkpointRegions", fromCheckpoint, "logRecords", records, "tornBytes", torn, "recoveredRegions", bm.GetCardinality())
	return bm, maxGen, nil
}

func (j *Journal) readLog(gen uint64) (logContents, error) {
	name := logName(gen)
	data, err := os.ReadFile(filepath.Join(j.dir, name))
	if err != nil {
		return logContents{}, fmt.Errorf("reading %s: %w", name, err)
	}
	lc, err := decodeLog(data, j.geo())
	if err != nil {
		return lc, fmt.Errorf("%s: %w", name, err)
	}
	if lc.gen != gen {
		return lc, fmt.Errorf("%w: %s: header says generation %d", ErrCorrupt, name, lc.gen)
	}
	return lc, nil
}

// Checkpoint atomically replaces the checkpoint with b and starts a new, empty
// log generation, so later Marks must mark their extents again.
//
// b is the caller's dirty bitmap (Tracker.Dirty). It may have been taken
// before the call and Marks may run concurrently: the checkpoint written is b
// ∪ every region of the extents marked in the generation being retired, so an
// extent marked at any time before the switch stays covered. b must cover the
// writes marked in earlier generations (see the package documentation for the
// ordering that guarantees it). b is not modified. Checkpoint and Close are
// serialized.
func (j *Journal) Checkpoint(b *roaring.Bitmap) error {
	j.ckptMu.Lock()
	defer j.ckptMu.Unlock()
	content, err := j.checkpointContent(b)
	if err != nil {
		return err
	}
	if err := j.rotate(content, true, j.keepHot.Load()); err != nil {
		return fmt.Errorf("checkpoint of bitmap journal %s: %w", j.dir, err)
	}
	return nil
}

// Grow makes the journal track a volume of size bytes (same region and
// extent size) and writes b as a checkpoint of that size, as Checkpoint
// does: every file written from then on (log gen+1, checkpoint gen+1)
// records the new size. b is the caller's dirty bitmap, as for Checkpoint.
// Marks of the old volume may run meanwhile; the caller marks nothing past
// the old end before Grow returns. A size below the current one is refused.
//
// A crash at any point leaves files of the old size, of the new size, or
// both (checkpoint gen of the old size and log gen+1 of the new one), all
// readable by OpenJournal at either size (see the package documentation:
// Growing). If writing the checkpoint fails, the journal still tracks the
// new size (its new log is in use) and the error is returned; calling Grow
// again retries the checkpoint.
func (j *Journal) Grow(size int64, b *roaring.Bitmap) error {
	j.ckptMu.Lock()
	defer j.ckptMu.Unlock()
	cur := j.geo()
	if size < cur.size {
		return fmt.Errorf("growing bitmap journal %s to %d bytes: it tracks %d, a volume never shrinks", j.dir, size, cur.size)
	}
	g, err := newGeometry(size, cur.regionSize, cur.extentSize)
	if err != nil {
		return fmt.Errorf("growing bitmap journal %s: %w", j.dir, err)
	}
	content, err := j.checkpointContent(b)
	if err != nil {
		return err
	}
	// From here on the new log's header, its extent sets and the
	// checkpoint have the new size; Marks still in flight are of the old
	// volume, which the new geometry contains.
	j.geoP.Store(&g)
	if err := j.rotate(content, true, j.keepHot.Load()); err != nil {
		return fmt.Errorf("growing bitmap journal %s to %d bytes: %w", j.dir, size, err)
	}
	j.log.Info("bitmap journal grown", "dir", j.dir, "size", size, "regions", g.regions, "previousSize", cur.size)
	return nil
}

func (j *Journal) checkpointContent(b *roaring.Bitmap) (*roaring.Bitmap, error) {
	j.mu.Lock()
	closing := j.closing
	j.mu.Unlock()
	if closing {
		return nil, ErrClosed
	}
	// A failed journal checkpoints too: rotate opens a new log, which is
	// what recovers it.
	if b == nil {
		return roaring.New(), nil
	}
	if !b.IsEmpty() && b.Maximum() >= j.geo().regions {
		return nil, fmt.Errorf("checkpoint of bitmap journal %s: region %d outside the volume's %d regions", j.dir, b.Maximum(), j.geo().regions)
	}
	return b.Clone(), nil
}

// rotate starts log generation gen+1 and writes content (plus carry, plus the
// retired generation's extents if unionRetired) as checkpoint gen+1, then
// removes the older logs. With keepHot, log gen+1 starts with a record of the
// extents written during generation gen, and those extents start out marked
// in gen+1. The order makes every crash point recoverable:
//
//  1. create and fsync log gen+1 (with the hot extents) and the directory;
//     no Mark uses it yet, and recovery (checkpoint ≤ gen, logs ≤ gen+1) only
//     gains the hot extents, which were marked in log gen anyway;
//  2. switch Marks to it: wait for a flush in progress on gen, swap file and
//     extent set; extents marked from now on go to gen+1;
//  3. write checkpoint gen+1 (temp file, fsync, rename, fsync dir); recovery
//     is either the old checkpoint + logs ≥ old gen, or the new checkpoint +
//     logs ≥ gen+1;
//  4. delete logs < gen+1, which no checkpoint needs any more.
//
// The caller holds ckptMu (or is OpenJournal, before the flusher starts).
func (j *Journal) rotate(content *roaring.Bitmap, unionRetired, keepHot bool) error {
	newGen := j.gen + 1 // only rotate writes j.gen, and rotations are serialized
	var hot []extentRun
	if keepHot {
		j.used.Load().forEachRun(func(first, last uint32) {
			hot = append(hot, extentRun{first: first, n: last - first + 1})
		})
	}
	nf, off, err := j.createLog(newGen, hot)
	if err != nil {
		return err
	}
	newSet := newExtSet(j.geo().extents)
	carried := 0
	for _, r := range hot {
		newSet.addRange(r.first, r.first+r.n-1)
		carried += int(r.n)
	}

	j.mu.Lock()
	j.swapping = true
	for j.flushing {
		j.cond.Wait()
	}
	oldF, oldSet := j.f, j.set.Load()
	j.f, j.gen, j.off = nf, newGen, off
	j.set.Store(newSet)
	j.used.Store(newExtSet(j.geo().extents))
	j.swapping = false
	// A log that failed is retired now; the new one was written and synced.
	j.recoveredLocked("checkpoint")
	j.cond.Broadcast()
	j.mu.Unlock()
	j.carried.Add(uint64(carried))

	if oldF != nil {
		// Every record in it was fdatasynced before its Marks returned.
		_ = oldF.Close()
	}
	retired := 0
	if unionRetired {
		retired = oldSet.count()
		oldSet.addRegionsTo(j.geo(), j.carry)
	}
	content.Or(j.carry)
	if err := j.writeCheckpoint(newGen, content); err != nil {
		// Logs < newGen stay on disk and carry keeps their extents for the
		// next checkpoint.
		return err
	}
	j.retired.Store(uint64(retired))
	j.carry = roaring.New()
	j.removeLogsBefore(newGen)
	return nil
}

// createLog creates log gen with its header and, if hot is not empty, one
// record of the hot extents, fdatasyncs it and the directory, and returns it
// with its append offset.
func (j *Journal) createLog(gen uint64, hot []extentRun) (*os.File, int64, error) {
	if err := j.fault(FaultCreateLog); err != nil {
		return nil, 0, fmt.Errorf("creating %s: %w", logName(gen), err)
	}
	path := filepath.Join(j.dir, logName(gen))
	// O_TRUNC, not O_EXCL: a file of this generation can only be left over
	// from a rotation that failed before switching to it, so it holds nothing.
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("creating log: %w", err)
	}
	fail := func(err error) (*os.File, int64, error) {
		f.Close()
		os.Remove(path)
		return nil, 0, fmt.Errorf("creating %s: %w", logName(gen), err)
	}
	hdr := appendLogHeader(nil, gen, j.geo())
	if _, err := f.WriteAt(hdr, 0); err != nil {
		return fail(err)
	}
	if err := fsutil.Fdatasync(f); err != nil {
		return fail(err)
	}
	if err := fsutil.SyncDir(j.dir); err != nil {
		return fail(err)
	}
	off := int64(len(hdr))
	if len(hot) > 0 {
		// A separate append after the durable header: a crash tearing it
		// leaves a torn last record, which recovery ignores.
		var rec []byte
		for len(hot) > 0 {
			k := min(len(hot), maxRunsPerRecord)
			rec = appendRecord(rec, gen, hot[:k])
			hot = hot[k:]
		}
		if _, err := f.WriteAt(rec, off); err != nil {
			return fail(err)
		}
		if err := fsutil.Fdatasync(f); err != nil {
			return fail(err)
		}
		j.fsyncs.Add(1)
		off += int64(len(rec))
	}
	j.fsyncs.Add(2)
	return f, off, nil
}

func (j *Journal) writeCheckpoint(gen uint64, bm *roaring.Bitmap) error {
	bm.RunOptimize()
	data, err := encodeCheckpoint(gen, j.geo(), bm)
	if err != nil {
		return err
	}
	if err := j.fault(FaultCheckpoint); err != nil {
		return fmt.Errorf("writing checkpoint: %w", err)
	}
	// Through checkpoint.tmp, the name the format gives it: OpenJournal and
	// ResetJournal delete it.
	if err := fsutil.WriteFileAtomicVia(filepath.Join(j.dir, checkpointName), checkpointTmp, data, 0o600); err != nil {
		return fmt.Errorf("writing checkpoint: %w", err)
	}
	j.fsyncs.Add(2)
	j.checkpoints.Add(1)
	j.checkpointBytes.Store(uint64(len(data)))
	j.log.V(1).Info("bitmap checkpoint written", "dir", j.dir, "generation", gen,
		"regions", bm.GetCardinality(), "bytes", len(data))
	return nil
}

// removeLogsBefore deletes logs older than gen. Failures only leave stale
// files that recovery ignores, so they are logged, not returned.
func (j *Journal) removeLogsBefore(gen uint64) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		j.log.Error(err, "listing bitmap journal for cleanup", "dir", j.dir)
		return
	}
	removed := 0
	for _, e := range entries {
		if g, ok := parseLogName(e.Name()); ok && g < gen {
			if err := os.Remove(filepath.Join(j.dir, e.Name())); err != nil {
				j.log.Error(err, "removing retired intent log", "dir", j.dir, "file", e.Name())
				continue
			}
			removed++
		}
	}
	if removed > 0 {
		if err := fsutil.SyncDir(j.dir); err != nil {
			j.log.Error(err, "syncing bitmap journal directory", "dir", j.dir)
		}
	}
}
