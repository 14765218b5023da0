package bitmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"

	"github.com/RoaringBitmap/roaring/v2"
)

// ErrCorrupt is returned (wrapped) when the on-disk bitmap state cannot be
// trusted: a checksum failure in the checkpoint or in the middle of a log, a
// bad magic or version, or a missing file the protocol guarantees exists. The
// caller must treat the bitmaps as lost and fall back to a full resync (then
// ResetJournal and reopen).
var ErrCorrupt = errors.New("bitmap journal corrupt")

// ErrGeometry is returned (wrapped) when a journal on disk was written for a
// different volume size, region size or extent size.
var ErrGeometry = errors.New("bitmap journal geometry mismatch")

// errTornHeader reports a log file whose header was never completely written
// (crash while creating it). Only the newest log may be in this state.
var errTornHeader = errors.New("log header torn")

const (
	formatVersion = 1

	logMagic       = "TNDMWLOG"
	logHeaderLen   = 56
	recHeaderLen   = 16
	recTypeExtents = 1
	// maxRecordPayload bounds one record; a length field above it is corrupt,
	// not torn. A batch never exceeds it (see maxRunsPerRecord).
	maxRecordPayload = 1 << 20
	maxRunsPerRecord = (maxRecordPayload - 8) / 8

	ckptMagic     = "TNDMCKPT"
	ckptHeaderLen = 64
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// extentRun is a run of n consecutive extents starting at first.
type extentRun struct {
	first, n uint32
}

// appendLogHeader appends the 56-byte header of log generation gen.
func appendLogHeader(dst []byte, gen uint64, g *geometry) []byte {
	start := len(dst)
	dst = append(dst, logMagic...)
	dst = binary.LittleEndian.AppendUint32(dst, formatVersion)
	dst = binary.LittleEndian.AppendUint32(dst, 0) // flags
	dst = binary.LittleEndian.AppendUint64(dst, gen)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(g.size))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(g.regionSize))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(g.extentSize))
	dst = binary.LittleEndian.AppendUint32(dst, crc32.Checksum(dst[start:], castagnoli))
	dst = binary.LittleEndian.AppendUint32(dst, 0) // reserved
	return dst
}

// appendRecord appends one extents record of log generation gen holding runs.
func appendRecord(dst []byte, gen uint64, runs []extentRun) []byte {
	plen := 8 + 8*len(runs)
	start := len(dst)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(plen))
	dst = binary.LittleEndian.AppendUint32(dst, ^uint32(plen))
	dst = binary.LittleEndian.AppendUint32(dst, 0) // crc, filled below
	dst = binary.LittleEndian.AppendUint32(dst, 0) // reserved
	dst = append(dst, recTypeExtents, 0, 0, 0)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(runs)))
	for _, r := range runs {
		dst = binary.LittleEndian.AppendUint32(dst, r.first)
		dst = binary.LittleEndian.AppendUint32(dst, r.n)
	}
	rec := dst[start:]
	binary.LittleEndian.PutUint32(rec[8:], recordCRC(gen, rec))
	return dst
}

// recordCRC is CRC32-C over the generation (little-endian u64), the length
// words (record bytes 0..7) and the reserved word plus payload (bytes 12..).
// Binding the generation makes a record valid only in its own log file.
func recordCRC(gen uint64, rec []byte) uint32 {
	var g [8]byte
	binary.LittleEndian.PutUint64(g[:], gen)
	c := crc32.Update(0, castagnoli, g[:])
	c = crc32.Update(c, castagnoli, rec[0:8])
	return crc32.Update(c, castagnoli, rec[12:])
}

// logContents is what decodeLog found in one log file.
type logContents struct {
	gen     uint64
	runs    []extentRun
	size    int64 // the volume size in the header
	records int
	valid   int // bytes of header and intact records
	torn    int // bytes of an ignored torn tail
}

// decodeLog parses a whole log file, returning runs clipped to g (the
// file's own volume size bounds them first, see checkGeometry). A torn last record (short, or with a bad
// checksum and nothing after it) and trailing zero bytes are ignored: such a
// record was never fsynced, so no Mark returned for it. Any other damage is
// ErrCorrupt; a header of different geometry is ErrGeometry. A header that
// was never completely written, with nothing after it, is errTornHeader.
func decodeLog(data []byte, g *geometry) (logContents, error) {
	var lc logContents
	if len(data) < logHeaderLen || allZero(data[:logHeaderLen]) {
		if len(data) <= logHeaderLen || allZero(data) {
			return lc, errTornHeader
		}
		return lc, fmt.Errorf("%w: log header zero or short but %d bytes follow", ErrCorrupt, len(data))
	}
	h := data[:logHeaderLen]
	if crc32.Checksum(h[:48], castagnoli) != binary.LittleEndian.Uint32(h[48:]) {
		if len(data) == logHeaderLen {
			return lc, errTornHeader
		}
		return lc, fmt.Errorf("%w: log header checksum mismatch", ErrCorrupt)
	}
	if string(h[:8]) != logMagic {
		return lc, fmt.Errorf("%w: log header: bad magic %q", ErrCorrupt, h[:8])
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != formatVersion {
		return lc, fmt.Errorf("%w: log header: unsupported version %d", ErrCorrupt, v)
	}
	if f, r := binary.LittleEndian.Uint32(h[12:]), binary.LittleEndian.Uint32(h[52:]); f != 0 || r != 0 {
		return lc, fmt.Errorf("%w: log header: unknown flags %#x/%#x", ErrCorrupt, f, r)
	}
	lc.gen = binary.LittleEndian.Uint64(h[16:])
	fg, err := checkGeometry(h[24:48], g)
	if err != nil {
		return lc, fmt.Errorf("log generation %d: %w", lc.gen, err)
	}
	lc.size = fg.size

	off := logHeaderLen
	for off < len(data) {
		rest := data[off:]
		if len(rest) < recHeaderLen {
			lc.torn = len(rest)
			break
		}
		if allZero(rest[:recHeaderLen]) {
			if allZero(rest) {
				lc.torn = len(rest) // zero-filled tail: nothing was written here
				break
			}
			return lc, fmt.Errorf("%w: log record at offset %d: zero header followed by data", ErrCorrupt, off)
		}
		plen := binary.LittleEndian.Uint32(rest[0:])
		if inv := binary.LittleEndian.Uint32(rest[4:]); plen != ^inv {
			return lc, fmt.Errorf("%w: log record at offset %d: length %#x does not match its complement %#x", ErrCorrupt, off, plen, inv)
		}
		if plen < 8 || plen%8 != 0 || plen > maxRecordPayload {
			return lc, fmt.Errorf("%w: log record at offset %d: invalid length %d", ErrCorrupt, off, plen)
		}
		end := recHeaderLen + int(plen)
		if end > len(rest) {
			lc.torn = len(rest)
			break
		}
		rec := rest[:end]
		if recordCRC(lc.gen, rec) != binary.LittleEndian.Uint32(rec[8:]) {
			if end == len(rest) || allZero(rest[end:]) {
				lc.torn = len(rest)
				break
			}
			return lc, fmt.Errorf("%w: log record at offset %d: checksum mismatch", ErrCorrupt, off)
		}
		runs, err := parseRecordPayload(rec[12:], &fg)
		if err != nil {
			return lc, fmt.Errorf("log record at offset %d: %w", off, err)
		}
		lc.runs = appendClipped(lc.runs, runs, g.extents)
		lc.records++
		off += end
		lc.valid = off
	}
	if lc.valid == 0 {
		lc.valid = logHeaderLen
	}
	return lc, nil
}

// appendClipped appends to dst the parts of runs below extents: a log of a
// larger volume (a grow whose metadata was never committed) marks nothing
// past the caller's end that was ever written (see Growing).
func appendClipped(dst, runs []extentRun, extents uint32) []extentRun {
	for _, r := range runs {
		if r.first >= extents {
			continue
		}
		r.n = min(r.n, extents-r.first)
		dst = append(dst, r)
	}
	return dst
}

// parseRecordPayload parses the reserved word and payload of a record whose
// checksum has been verified.
func parseRecordPayload(p []byte, g *geometry) ([]extentRun, error) {
	if r := binary.LittleEndian.Uint32(p); r != 0 {
		return nil, fmt.Errorf("%w: reserved word %#x", ErrCorrupt, r)
	}
	p = p[4:]
	if p[0] != recTypeExtents || p[1] != 0 || p[2] != 0 || p[3] != 0 {
		return nil, fmt.Errorf("%w: unknown record type %d", ErrCorrupt, p[0])
	}
	count := binary.LittleEndian.Uint32(p[4:])
	if uint64(len(p)) != 8+8*uint64(count) {
		return nil, fmt.Errorf("%w: %d runs in a %d-byte payload", ErrCorrupt, count, len(p))
	}
	runs := make([]extentRun, count)
	for i := range runs {
		b := p[8+8*i:]
		r := extentRun{first: binary.LittleEndian.Uint32(b), n: binary.LittleEndian.Uint32(b[4:])}
		if r.n == 0 || uint64(r.first)+uint64(r.n) > uint64(g.extents) {
			return nil, fmt.Errorf("%w: extent run %d+%d outside %d extents", ErrCorrupt, r.first, r.n, g.extents)
		}
		runs[i] = r
	}
	return runs, nil
}

// encodeCheckpoint serializes bm as checkpoint generation gen.
func encodeCheckpoint(gen uint64, g *geometry, bm *roaring.Bitmap) ([]byte, error) {
	var payload bytes.Buffer
	payload.Grow(ckptHeaderLen + int(bm.GetSerializedSizeInBytes()))
	payload.Write(make([]byte, ckptHeaderLen))
	if _, err := bm.WriteTo(&payload); err != nil {
		return nil, fmt.Errorf("serializing bitmap: %w", err)
	}
	buf := payload.Bytes()
	h := buf[:0]
	h = append(h, ckptMagic...)
	h = binary.LittleEndian.AppendUint32(h, formatVersion)
	h = binary.LittleEndian.AppendUint32(h, 0) // flags
	h = binary.LittleEndian.AppendUint64(h, gen)
	h = binary.LittleEndian.AppendUint64(h, uint64(g.size))
	h = binary.LittleEndian.AppendUint64(h, uint64(g.regionSize))
	h = binary.LittleEndian.AppendUint64(h, uint64(g.extentSize))
	h = binary.LittleEndian.AppendUint64(h, uint64(len(buf)-ckptHeaderLen))
	h = binary.LittleEndian.AppendUint32(h, crc32.Checksum(buf[ckptHeaderLen:], castagnoli))
	binary.LittleEndian.AppendUint32(h, crc32.Checksum(h, castagnoli))
	return buf, nil
}

// decodeCheckpoint parses a whole checkpoint file. Any damage is ErrCorrupt;
// a checkpoint of different geometry is ErrGeometry.
func decodeCheckpoint(data []byte, g *geometry) (gen uint64, bm *roaring.Bitmap, err error) {
	if len(data) < ckptHeaderLen {
		return 0, nil, fmt.Errorf("%w: checkpoint: %d bytes, shorter than its header", ErrCorrupt, len(data))
	}
	h := data[:ckptHeaderLen]
	if crc32.Checksum(h[:60], castagnoli) != binary.LittleEndian.Uint32(h[60:]) {
		return 0, nil, fmt.Errorf("%w: checkpoint header checksum mismatch", ErrCorrupt)
	}
	if string(h[:8]) != ckptMagic {
		return 0, nil, fmt.Errorf("%w: checkpoint: bad magic %q", ErrCorrupt, h[:8])
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != formatVersion {
		return 0, nil, fmt.Errorf("%w: checkpoint: unsupported version %d", ErrCorrupt, v)
	}
	if f := binary.LittleEndian.Uint32(h[12:]); f != 0 {
		return 0, nil, fmt.Errorf("%w: checkpoint: unknown flags %#x", ErrCorrupt, f)
	}
	gen = binary.LittleEndian.Uint64(h[16:])
	fg, err := checkGeometry(h[24:48], g)
	if err != nil {
		return 0, nil, fmt.Errorf("checkpoint generation %d: %w", gen, err)
	}
	plen := binary.LittleEndian.Uint64(h[48:])
	if plen != uint64(len(data)-ckptHeaderLen) {
		return 0, nil, fmt.Errorf("%w: checkpoint: header says %d payload bytes, file has %d", ErrCorrupt, plen, len(data)-ckptHeaderLen)
	}
	payload := data[ckptHeaderLen:]
	if crc32.Checksum(payload, castagnoli) != binary.LittleEndian.Uint32(h[56:]) {
		return 0, nil, fmt.Errorf("%w: checkpoint payload checksum mismatch", ErrCorrupt)
	}
	bm, err = decodeRoaring(payload)
	if err != nil {
		return 0, nil, fmt.Errorf("%w: checkpoint payload: %w", ErrCorrupt, err)
	}
	if !bm.IsEmpty() && bm.Maximum() >= fg.regions {
		return 0, nil, fmt.Errorf("%w: checkpoint: region %d outside %d regions", ErrCorrupt, bm.Maximum(), fg.regions)
	}
	// A checkpoint of a larger volume (a grow whose metadata was never
	// committed) can hold no region past g's end: nothing was written
	// there before the grow completed.
	bm.RemoveRange(uint64(g.regions), 1<<32)
	return gen, bm, nil
}

// decodeRoaring deserializes a roaring bitmap that must span exactly p and be
// internally consistent. The decoder is third-party code fed bytes that
// passed a CRC; a panic is still turned into an error.
func decodeRoaring(p []byte) (bm *roaring.Bitmap, err error) {
	defer func() {
		if r := recover(); r != nil {
			bm, err = nil, fmt.Errorf("roaring decoder panicked: %v", r)
		}
	}()
	bm = roaring.New()
	n, err := bm.ReadFrom(bytes.NewReader(p))
	if err != nil {
		return nil, err
	}
	if n != int64(len(p)) {
		return nil, fmt.Errorf("bitmap is %d bytes, payload %d", n, len(p))
	}
	if err := bm.Validate(); err != nil {
		return nil, err
	}
	return bm, nil
}

// checkGeometry compares the size, regionSize, extentSize words of a header
// with g and returns the geometry the file was written with. Only the size
// may differ (a volume that grew: Journal.Grow); the file's own size then
// bounds its records, and the caller clips what it recovers to g.
func checkGeometry(b []byte, g *geometry) (geometry, error) {
	size := binary.LittleEndian.Uint64(b[0:])
	rs := binary.LittleEndian.Uint64(b[8:])
	es := binary.LittleEndian.Uint64(b[16:])
	if rs != uint64(g.regionSize) || es != uint64(g.extentSize) || size > math.MaxInt64 {
		return geometry{}, fmt.Errorf("%w: on disk size=%d regionSize=%d extentSize=%d, want size=%d regionSize=%d extentSize=%d",
			ErrGeometry, size, rs, es, g.size, g.regionSize, g.extentSize)
	}
	if size == uint64(g.size) {
		return *g, nil
	}
	fg, err := newGeometry(int64(size), g.regionSize, g.extentSize)
	if err != nil {
		return geometry{}, fmt.Errorf("%w: on disk size=%d: %w", ErrCorrupt, size, err)
	}
	return fg, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
