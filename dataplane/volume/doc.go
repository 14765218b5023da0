// Package volume is the replication engine of one replica: it serves client
// I/O when this member is the acting primary, mirrors every write to each
// other member over one ordered stream per member, tracks in a dirty bitmap
// per member what that member may lack, and runs the patent's transitions
// (PAIR, SWAP, COPY, failback) when the controller changes the desired role
// and epoch.
//
// # Members
//
// A pair has one writer and one or more backups (Spec.PeerNode and
// Spec.MoreBackups). The writer keeps a link and a tracker per backup: a
// write is queued on every link (the client's buffer goes to the last,
// the others copy it) or, for a backup that is not streaming, marked in
// that backup's tracker; each backup's acks clear only its own tracker, so
// each lags, and resyncs, on its own. A write is acknowledged once every
// Sync backup applied it (or was recorded Outdated by the controller:
// PeerOutdated names the member); Async backups never hold it beyond their
// queue bound. The write-intent journal is shared: its checkpoints hold
// the union of the trackers, and after a crash every tracker restarts from
// it (over-reporting for a member that was ahead, never under-reporting).
// The metadata records the tracked members (meta.Meta.Peer, OtherPeers).
// A backup that knows the other backups (its spec's MoreBackups) keeps a
// tracker of each: the frames it applies are journaled and marked there
// until the writer's watermarks say the others hold them (watermark.go).
// Promoted, it resyncs each other member by the OR of its tracker of that
// member and that member's tracker of it, as with a returning primary.
//
// # Write path (acting primary)
//
//  1. Admission: the volume must be the writer (role Primary, authority
//     valid for its epoch) and not holding writes for a failback; held writes
//     wait, they are not failed.
//  2. Write intent: the coarse extent holding the write is durably marked in
//     the journal (bitmap.Journal) before anything else, so a crash can never
//     lose the knowledge that the region may differ (invariant 3). If the
//     journal cannot mark it (its disk is full or failing), the write fails
//     with EIO before touching the local store; the member reports itself
//     not writable (Fault) until the journal has reopened its log, which it
//     does by itself once the disk works again.
//  3. Under the region locks: the local store is written and the frame is
//     queued on the link with the next sequence number (carrying the NBD
//     server's own payload buffer, WriteAtTake, not a copy), and the tracker
//     marks the regions with that seq. Holding the region locks across both makes
//     the peer apply overlapping writes in the same order as the local store,
//     and makes a resync copy of a region (read + queue, under the same lock)
//     unable to overwrite a newer live write on the peer. A local write
//     that fails is not queued; its range is marked for resync instead, as
//     the store may have changed part of it (a torn write), and the client
//     gets the error.
//  4. FUA: the local store is synced.
//  5. Sync mode: the write is acknowledged only after the peer applied it. If
//     the link is down, the write is held until the controller has recorded
//     the peer as Outdated (PeerOutdated), invariant 2. Async mode
//     acknowledges after the local copy.
//
// Write intent is cheap in the steady state: the journal keeps extents that
// keep being written marked across checkpoints (bitmap.Journal.KeepHot) and
// marks ahead of sequential writers, so a write waits for a group commit only
// when it enters an extent not written for a while.
//
// # Backup
//
// The backup applies frames in order and acks them as applied at once and as
// durable after an fdatasync: every 20 ms, or at once for a FUA write or a
// Flush (the syncer; the apply loop goes on meanwhile; CopyDone is made
// durable inline, before the backup reports UpToDate). The
// primary clears a region's bit only on a durable ack covering every frame
// that wrote it (invariant 3).
//
// # Resync (COPY)
//
// Every time the link (re)connects, the backup answers the handshake with its
// own dirty bitmap (writes it acknowledged as a primary that may never have
// reached the other side). The primary journals and ORs it into its own
// bitmap (unless mergePeerBitmap is false) and copies exactly the regions
// whose bits are set, rate-limited, while live writes continue, each region
// in chunks of at most 4 MiB (a chunk of zeros as a Zero frame). The backup
// is Inconsistent from the first copied region until the primary sends
// CopyDone, then UpToDate. With mergePeerBitmap false the backup keeps its
// own diff as unmerged regions (the replicas differ there; reported in
// Status.UnmergedRegions until a write or copy covers them).
//
// # Identity
//
// The metadata records whether the replica holds the data of the pair
// (Spec.PairUID) and whether its store is still all zeros. A replica that
// does not hold the pair's data (new, wiped, its data file lost, another
// pair's) is Inconsistent, refuses the writer role unless Spec.Initialize
// says it starts the pair's data, and gets a full copy at its next
// handshake; CopyDone makes it hold the pair's data. Two all-zero replicas
// need no copy. A backup refuses a primary whose Hello names another pair.
//
// # Member replacement
//
// A replica's bitmaps describe its differences to the member it tracks,
// the peer recorded in its metadata. When Apply gives it another peer (the
// controller replaced a member: A+B becomes A+C, maybe A+B again later),
// they mean nothing for the new one: Apply durably sets the metadata's
// PeerChanged before acting on the new spec, comparing against the peer
// in the metadata after a restart (a replica without one, new or legacy,
// sets nothing). With the flag set, the next resync with the new peer
// copies the whole volume, whichever side has it: a writer copies
// everything (unless both stores hold only zeros), a backup's HelloAck
// asks for it (FullCopy). The writer clears its flag once the full copy's
// regions are journaled as owed to the new peer; the backup once the full
// copy completes (CopyDone). Without it, a returning member that still
// holds the pair's data would get only the regions written since the
// replacement's sync, and stay silently stale.
//
// # Role changes
//
// Apply and the attaching of a new stream (ServePrimary) are serialised. A
// change of role or epoch, or a newer stream from the same primary, first
// stops the current backup stream and waits for the frame it is applying:
// every effect of a frame is made under the stream's lock, after checking
// the stream was not stopped, so nothing the old primary sent lands once
// this member plays its new part. Role and epoch are persisted before they
// are acted on.
//
// # Failback (DELPAIR)
//
// With Hold set, new writes wait at admission; once the in-flight writes are
// acknowledged and the bitmap is empty the status reports drained. The
// controller then swaps the roles with a new epoch; writes that were held on
// the old writer are forwarded over the replication link to the new writer
// (which mirrors them back), so no client write fails. The new writer's
// first authority grant may not have come yet: requests wait for it
// (ErrAuthorityPending) rather than fail. Connections that stay
// open on the old writer keep being forwarded; new ones are refused. A
// forwarded request whose stream ends before its answer (the writer stepped
// down again, as when a failback goes back and forth) is issued again
// wherever the writer is now; a member never forwards back a request its
// peer forwarded to it, the peer issues it again itself. A stream carries at
// most 64 forwarded requests (64 MiB) outstanding: the old writer waits for
// room, the new writer drops a stream that exceeds it, and charges the
// payloads to the agent's in-flight budget (Options.Budget).
//
// # Growing
//
// Grow makes the replica larger while I/O runs (never smaller: ErrShrink);
// Open with Options.Size above the metadata's size opens the replica at
// its own size and grows it the same way. The steps, in order: the store
// grows (a file is extended sparse and fsynced; the new space reads as
// zeros), the journal switches to the new size with a checkpoint
// (bitmap.Journal.Grow), every tracker gains the new regions clean (every
// member reads zeros there, so the grow marks nothing dirty), the
// metadata records the new size (the commit point), and only then does the
// volume admit requests past the old end (client I/O, a backup's frames;
// Status.Size and Size report the new size). A crash before the commit
// leaves a replica that opens at its old size with every dirty bit (a store
// file longer than the metadata's size, and journal or unmerged-region files
// of the new size, are read as they are); after it, one that opens at the
// new size. A step that fails leaves the replica at its old size and
// usable; Grow may be called again. A journal keeps its extent size when
// its volume grows (Open uses the extent size of the journal on disk), so
// a grow past 2^26 of its extents is refused (ErrGrowLimit).
//
// A backup accepts a primary of its size or smaller (repl: Volume size):
// the controller grows backups first. It refuses a larger primary with a
// Nack naming both sizes (the link retries; the writes past its end stay in
// the primary's tracker and are copied by the resync once it grew), and a
// frame past its end ends the stream (the primary grew while streaming to a
// backup that had not). A full copy from a smaller primary zeroes the
// backup's store past the primary's end, where the primary reads zeros.
//
// # Close
//
// Close refuses new writes and waits (Options.CloseTimeout) for the admitted
// ones before it stops the link and writes the final checkpoint, so a write
// that reached the local disk but not the peer is dirty after a restart.
//
// # Time
//
// What the volume measures and reports is read from Options.Clock (tests
// give it a fake clock): failback hold durations, the oldest-unreplicated
// age, the copy's start, rate and ETA, the last error's time, the
// metadata's UpdatedAt, and the checkpoint ticker. The waits that bound I/O
// stay on real time whatever the clock (connection deadlines, the link's
// reconnect backoff and ping ticker, the backup's sync cadence, the wait for
// a new writer's authority, Close's timeout, forwarding waits): a stopped
// fake clock must not hang a connection or a shutdown.
package volume
