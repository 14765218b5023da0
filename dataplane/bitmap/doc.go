// Package bitmap tracks which regions of a replicated volume the peer may
// lack (invariant 3, docs/architecture.md): an in-memory dirty bitmap (Tracker)
// and its crash-safe on-disk form (Journal), a write-intent log of coarse
// extents plus checkpoints, like DRBD's activity log or md's write-intent
// bitmap.
//
// # Invariant
//
// A region's bit is clear only if the peer holds every acknowledged write to
// it, and that stays true across a crash of this node: recovery returns a
// superset of the regions that were dirty.
//
// # Write path
//
// For each client write of [off, off+n) the volume engine, in this order:
//
//  1. assigns the replication seq and calls Tracker.Mark(off, n, seq) (or
//     Tracker.MarkRegions while the peer is away);
//  2. calls Journal.Mark(ctx, off, n), which returns once the extents holding
//     the range are durable in the intent log (usually at once: extents stay
//     marked until the next checkpoint);
//  3. writes locally and ships the frame, and acknowledges the client only
//     after both.
//
// Marking before the local write means a crash can never leave a local change
// the bitmap does not know of. Tracker.Acked(upTo) clears regions once the
// peer has applied every frame that wrote them; Journal.Checkpoint(
// Tracker.Dirty()) then makes the smaller bitmap durable and empties the
// marked-extent set.
//
// Checkpoint writes its argument ∪ the extents of the log generation it
// retires, so a write whose Journal.Mark landed in that generation is covered
// however stale the snapshot is. Writes marked in older generations must be in
// the snapshot, i.e. their Tracker bit must be visible to any snapshot taken
// after the previous Checkpoint started. Either set the Tracker bit before
// Journal.Mark (step 1 before step 2, as above), or, if the Tracker is updated
// after Mark, exclude snapshots while a write is between the two (a
// sync.RWMutex held shared by writers, exclusively around Tracker.Dirty).
//
// Recovery (OpenJournal) = last checkpoint ∪ all regions of every extent in
// the logs the checkpoint does not cover. It over-reports by at most the
// extents written since the last checkpoint (plus those of the generation it
// retired), never under-reports. A peer's bitmap is merged with Tracker.Or;
// resync copies use CopyBegin/CopyDone so that a copy never clears a region
// that a newer write touched.
//
// # Files
//
// A journal directory holds:
//
//	LOCK                     flock(2)ed by the open Journal; never deleted
//	checkpoint               the last checkpoint (replaced atomically)
//	checkpoint.tmp           a checkpoint being written; deleted at open
//	intent-<gen>.log         write-intent log of generation gen, 16 lower-case
//	                         hex digits, e.g. intent-0000000000000003.log
//
// Checkpoint generation G means: the checkpoint covers every extent of every
// log with generation < G; logs G, G+1, … must be replayed. Log G is created
// (and it and the directory fsynced) before checkpoint G is renamed into
// place, and logs < G are deleted only after that, so at every crash point
// the directory holds a checkpoint G and all logs G..max. A missing log in
// that range, a log without a checkpoint that has records, or a checkpoint
// without log G is ErrCorrupt.
//
// All integers are little-endian. Every checksum is CRC-32C (Castagnoli).
//
// # Log file
//
// Header, 56 bytes:
//
//	off  size  field
//	  0     8  magic "TNDMWLOG"
//	  8     4  version = 1
//	 12     4  flags = 0
//	 16     8  generation (must match the file name)
//	 24     8  volume size in bytes
//	 32     8  region size in bytes
//	 40     8  extent size in bytes
//	 48     4  CRC-32C of bytes 0..47
//	 52     4  reserved = 0
//
// Then records, back to back (every record is a multiple of 8 bytes, so
// length words never straddle a sector). One group commit appends one record
// with one pwrite and then fdatasyncs:
//
//	off  size  field
//	  0     4  L = payload length (8 + 8·count, at most 1 MiB)
//	  4     4  ^L (bitwise complement of L)
//	  8     4  CRC-32C over generation (u64) ‖ bytes 0..7 ‖ bytes 12..16+L
//	 12     4  reserved = 0
//	 16     1  type = 1 (extent runs)
//	 17     3  zero
//	 20     4  count
//	 24  8·count  runs: first extent u32, number of extents u32 (≥ 1)
//
// Extent e covers bytes [e·extentSize, (e+1)·extentSize) of the volume.
// Binding the generation into the CRC makes a record valid only in its own
// file.
//
// Decoding: a record running past end of file, a last record whose CRC fails
// with nothing but zeros after it, and an all-zero tail are a torn write that
// no Mark was acknowledged for; they are ignored. A header that was never
// completely written (short, zero, or bad CRC with no records) is accepted
// only for the newest log, which no Mark has used yet. Anything else (L ≠
// ^L, an impossible L, a CRC failure followed by data, an extent outside the
// volume) is ErrCorrupt: when in doubt, report the bitmap lost rather than
// risk under-reporting. A region or extent size different from the caller's
// is ErrGeometry; a different volume size is not (see Growing).
//
// # Checkpoint file
//
// Header, 64 bytes, then the payload:
//
//	off  size  field
//	  0     8  magic "TNDMCKPT"
//	  8     4  version = 1
//	 12     4  flags = 0
//	 16     8  generation G (first log generation not covered)
//	 24     8  volume size in bytes
//	 32     8  region size in bytes
//	 40     8  extent size in bytes
//	 48     8  payload length P (file size must be exactly 64 + P)
//	 56     4  CRC-32C of the payload
//	 60     4  CRC-32C of bytes 0..59
//	 64     P  region bitmap in the portable Roaring format
//	           (github.com/RoaringBitmap/RoaringFormatSpec), regions < count
//
// It is written to checkpoint.tmp, fsynced, renamed over checkpoint, and the
// directory is fsynced. Any damage is ErrCorrupt.
//
// # Growing
//
// A volume may grow, never shrink; region and extent size stay. Tracker.Grow
// adds clean regions (the grown space reads as zeros on every member).
// Journal.Grow switches the journal to the new size and writes a checkpoint
// of it through the usual rotation, so log gen+1 and checkpoint gen+1 record
// the new size while older files record the old one. Every file records the
// size it was written for, which bounds its own extents and regions (past
// it, ErrCorrupt as before); OpenJournal reads files of any size with the
// caller's region and extent size and keeps what lies inside the caller's
// volume. The caller (the volume engine) marks nothing past the old end
// until its grow is committed (its metadata records the new size), so after
// a crash in the middle, opening at the old size loses no mark: whatever
// lies past the old end in a file of the new size was only ever zeros.
// The extent holding the old end over-reports its regions past it once
// read at the new size. The region set files (WriteRegionSet) follow the
// same rule.
//
// # Failure handling
//
// An error wrapping ErrCorrupt from OpenJournal means the bitmaps are lost:
// the caller resyncs the whole volume (and says so in status), then calls
// ResetJournal.
//
// A failed log append (a full disk, an I/O error; after an fsync error the
// page cache cannot be trusted either) fails the Journal: nothing is
// appended to that log again, and Marks of extents not already marked fail
// (Err says why), so their writes are never acknowledged; extents marked
// before stay durable and keep their fast path. The Journal recovers by
// itself when the disk does: the first Mark after a backoff (100 ms,
// doubling up to 5 s) creates log gen+1 (header, fdatasync, directory
// fsync) and appends there; a Checkpoint does the same as part of its
// rotation. The failed log stays until the next checkpoint retires it: the
// checkpoint on disk still names it, and its last record may be torn by the
// failed append, which recovery ignores since nothing follows it. No
// checkpoint is needed for the switch: checkpoint G already means "replay
// logs G, G+1, …". A failed Checkpoint keeps the old logs and carries their
// extents into the next one.
package bitmap
