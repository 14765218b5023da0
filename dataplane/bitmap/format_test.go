package bitmap

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"slices"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
)

func TestLogRoundTrip(t *testing.T) {
	g := mustGeo(t)
	const gen = 7
	batches := [][]extentRun{
		{{first: 0, n: 1}},
		{{first: 3, n: 2}, {first: 10, n: 1}},
		{{first: g.extents - 1, n: 1}},
	}
	data := appendLogHeader(nil, gen, g)
	var want []extentRun
	for _, b := range batches {
		data = appendRecord(data, gen, b)
		want = append(want, b...)
	}
	lc, err := decodeLog(data, g)
	if err != nil {
		t.Fatal(err)
	}
	if lc.gen != gen || lc.records != len(batches) || lc.valid != len(data) || lc.torn != 0 || !slices.Equal(lc.runs, want) {
		t.Fatalf("decodeLog = %+v, want gen %d, %d records, runs %v", lc, gen, len(batches), want)
	}
	// Every strict prefix is either a torn log or a torn header; none is
	// ErrCorrupt, and none recovers a record that was not complete.
	for n := 0; n < len(data); n++ {
		lc, err := decodeLog(data[:n], g)
		if errors.Is(err, errTornHeader) && n <= logHeaderLen {
			continue
		}
		if err != nil {
			t.Fatalf("prefix %d: %v", n, err)
		}
		if lc.valid+lc.torn != n {
			t.Fatalf("prefix %d: valid %d + torn %d", n, lc.valid, lc.torn)
		}
	}
}

func TestRecordLengthIsMultipleOf8(t *testing.T) {
	for n := 0; n < 5; n++ {
		rec := appendRecord(nil, 1, make([]extentRun, n))
		if len(rec)%8 != 0 {
			t.Fatalf("record with %d runs is %d bytes", n, len(rec))
		}
	}
	if logHeaderLen%8 != 0 || recHeaderLen%8 != 0 {
		t.Fatal("headers not 8-byte aligned")
	}
}

func TestCheckpointRoundTrip(t *testing.T) {
	g := mustGeo(t)
	for _, bm := range []*roaring.Bitmap{
		roaring.New(),
		roaring.BitmapOf(0, 1, 2, 5000, g.regions-1),
		func() *roaring.Bitmap { b := roaring.New(); b.AddRange(100, 9000); return b }(),
	} {
		data, err := encodeCheckpoint(42, g, bm)
		if err != nil {
			t.Fatal(err)
		}
		gen, got, err := decodeCheckpoint(data, g)
		if err != nil {
			t.Fatal(err)
		}
		if gen != 42 || !got.Equals(bm) {
			t.Fatalf("round trip: gen %d, %d regions, want 42, %d", gen, got.GetCardinality(), bm.GetCardinality())
		}
	}
}

func TestCheckpointRejectsRegionBeyondVolume(t *testing.T) {
	g := mustGeo(t)
	data, err := encodeCheckpoint(1, g, roaring.BitmapOf(g.regions))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := decodeCheckpoint(data, g); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("decodeCheckpoint = %v, want ErrCorrupt", err)
	}
}

func TestCheckpointRejectsBadPayloadWithGoodCRC(t *testing.T) {
	g := mustGeo(t)
	data, err := encodeCheckpoint(1, g, roaring.BitmapOf(1, 2, 3))
	if err != nil {
		t.Fatal(err)
	}
	for _, mutate := range []func([]byte) []byte{
		func(b []byte) []byte { b[ckptHeaderLen] ^= 0xff; return b },        // roaring cookie
		func(b []byte) []byte { return append(b, 0, 0, 0, 0) },              // trailing bytes
		func(b []byte) []byte { return b[:len(b)-2] },                       // short payload
		func(b []byte) []byte { b[len(b)-1], b[len(b)-3] = 0, 9; return b }, // unsorted array container
	} {
		d := fixCheckpointCRCs(mutate(slices.Clone(data)))
		if _, _, err := decodeCheckpoint(d, g); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("decodeCheckpoint of a damaged payload with valid CRCs = %v, want ErrCorrupt", err)
		}
	}
}

// fixCheckpointCRCs rewrites the payload length and both CRCs so that a
// mutated payload reaches the roaring decoder.
func fixCheckpointCRCs(d []byte) []byte {
	if len(d) < ckptHeaderLen {
		return d
	}
	binary.LittleEndian.PutUint64(d[48:], uint64(len(d)-ckptHeaderLen))
	binary.LittleEndian.PutUint32(d[56:], crc32.Checksum(d[ckptHeaderLen:], castagnoli))
	binary.LittleEndian.PutUint32(d[60:], crc32.Checksum(d[:60], castagnoli))
	return d
}

// fixLogCRCs rewrites the log header CRC and the CRC of every record whose
// length words are consistent, so mutated payloads reach the parser.
func fixLogCRCs(d []byte) []byte {
	if len(d) < logHeaderLen {
		return d
	}
	binary.LittleEndian.PutUint32(d[48:], crc32.Checksum(d[:48], castagnoli))
	gen := binary.LittleEndian.Uint64(d[16:])
	off := logHeaderLen
	for off+recHeaderLen <= len(d) {
		l := binary.LittleEndian.Uint32(d[off:])
		if l != ^binary.LittleEndian.Uint32(d[off+4:]) || l > maxRecordPayload || off+recHeaderLen+int(l) > len(d) {
			break
		}
		rec := d[off : off+recHeaderLen+int(l)]
		binary.LittleEndian.PutUint32(rec[8:], recordCRC(gen, rec))
		off += len(rec)
	}
	return d
}

func FuzzDecodeLog(f *testing.F) {
	g, err := newGeometry(tSize, tRegion, tExtent)
	if err != nil {
		f.Fatal(err)
	}
	valid := appendLogHeader(nil, 3, &g)
	valid = appendRecord(valid, 3, []extentRun{{first: 1, n: 2}})
	valid = appendRecord(valid, 3, []extentRun{{first: 9, n: 1}, {first: g.extents - 1, n: 1}})
	f.Add(valid, false)
	f.Add(valid[:len(valid)-3], false)                             // torn record
	f.Add(valid[:logHeaderLen], false)                             // header only
	f.Add(valid[:20], false)                                       // torn header
	f.Add(append(slices.Clone(valid), make([]byte, 64)...), false) // zero tail
	bad := slices.Clone(valid)
	bad[logHeaderLen+20] ^= 1
	f.Add(bad, false)      // CRC failure, middle
	f.Add(bad, true)       // same payload with fixed CRCs
	f.Add([]byte{}, false) // empty file
	f.Add([]byte("TNDMWLOG but not really a header"), false)
	// A log of a larger volume (a grow not committed): runs past g's end
	// are dropped.
	lg, err := newGeometry(2*tSize, tRegion, tExtent)
	if err != nil {
		f.Fatal(err)
	}
	larger := appendLogHeader(nil, 3, &lg)
	larger = appendRecord(larger, 3, []extentRun{{first: 1, n: 2}, {first: g.extents - 1, n: 4}, {first: lg.extents - 1, n: 1}})
	f.Add(larger, false)
	f.Fuzz(func(t *testing.T, data []byte, fix bool) {
		if fix {
			data = fixLogCRCs(slices.Clone(data))
		}
		lc, err := decodeLog(data, &g)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrGeometry) && !errors.Is(err, errTornHeader) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if lc.valid+lc.torn != len(data) {
			t.Fatalf("valid %d + torn %d != %d", lc.valid, lc.torn, len(data))
		}
		var total int
		for _, r := range lc.runs {
			if r.n == 0 || uint64(r.first)+uint64(r.n) > uint64(g.extents) {
				t.Fatalf("run %+v outside %d extents", r, g.extents)
			}
			total++
		}
		// Re-encoding the runs as one record and decoding gives them back.
		if lc.records > 0 {
			re := appendRecord(appendLogHeader(nil, lc.gen, &g), lc.gen, lc.runs)
			lc2, err := decodeLog(re, &g)
			if err != nil || !slices.Equal(lc2.runs, lc.runs) {
				t.Fatalf("re-encode: %v, runs %v vs %v", err, lc2.runs, lc.runs)
			}
		}
	})
}

func FuzzDecodeCheckpoint(f *testing.F) {
	g, err := newGeometry(tSize, tRegion, tExtent)
	if err != nil {
		f.Fatal(err)
	}
	add := func(bm *roaring.Bitmap) []byte {
		data, err := encodeCheckpoint(5, &g, bm)
		if err != nil {
			f.Fatal(err)
		}
		return data
	}
	empty := add(roaring.New())
	small := add(roaring.BitmapOf(1, 2, 3, 1000))
	runs := roaring.New()
	runs.AddRange(10, 5000)
	runs.AddRange(9000, 9100)
	withRuns := add(runs)
	dense := roaring.New()
	for i := uint32(0); i < 16000; i += 2 {
		dense.Add(i)
	}
	bitmapContainer := add(dense)
	for _, d := range [][]byte{empty, small, withRuns, bitmapContainer} {
		f.Add(d, false)
		f.Add(d, true)
		f.Add(d[:len(d)-1], true)
	}
	f.Add([]byte{}, false)
	f.Add(small[:ckptHeaderLen], true)
	// A checkpoint of a larger volume: regions past g's end are dropped.
	lg, err := newGeometry(2*tSize, tRegion, tExtent)
	if err != nil {
		f.Fatal(err)
	}
	larger, err := encodeCheckpoint(5, &lg, roaring.BitmapOf(1, g.regions-1, g.regions, lg.regions-1))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(larger, false)
	f.Fuzz(func(t *testing.T, data []byte, fix bool) {
		if fix {
			data = fixCheckpointCRCs(slices.Clone(data))
		}
		gen, bm, err := decodeCheckpoint(data, &g)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrGeometry) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if !bm.IsEmpty() && bm.Maximum() >= g.regions {
			t.Fatalf("region %d outside %d", bm.Maximum(), g.regions)
		}
		re, err := encodeCheckpoint(gen, &g, bm)
		if err != nil {
			t.Fatal(err)
		}
		gen2, bm2, err := decodeCheckpoint(re, &g)
		if err != nil || gen2 != gen || !bm2.Equals(bm) {
			t.Fatalf("re-encode: %v", err)
		}
	})
}
