package bitmap

import (
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
)

const (
	KiB = int64(1) << 10
	MiB = int64(1) << 20
	GiB = int64(1) << 30
	TiB = int64(1) << 40
)

func TestValidateGeometry(t *testing.T) {
	tests := []struct {
		name                 string
		size, region, extent int64
		wantErr              bool
	}{
		{"ok", 1 * GiB, 64 * KiB, 4 * MiB, false},
		{"extentZeroMeansRegion", 1 * GiB, 64 * KiB, 0, false},
		{"extentEqualsRegion", 1 * GiB, 64 * KiB, 64 * KiB, false},
		{"sizeZero", 0, 64 * KiB, 0, true},
		{"sizeNegative", -1, 64 * KiB, 0, true},
		{"regionNotPow2", 1 * GiB, 48 * KiB, 0, true},
		{"regionTooSmall", 1 * GiB, 256, 0, true},
		{"extentNotPow2", 1 * GiB, 64 * KiB, 3 * MiB, true},
		{"extentBelowRegion", 1 * GiB, 64 * KiB, 32 * KiB, true},
		{"tooManyRegions", 16 * TiB, 4 * KiB, 0, true},
		{"justFits", 16*TiB - 4*KiB, 4 * KiB, 0, false},
		{"hugeSizeNoOverflow", 1<<63 - 1, 1 << 32, 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateGeometry(tc.size, tc.region, tc.extent)
			if (err != nil) != tc.wantErr {
				t.Fatalf("ValidateGeometry(%d, %d, %d) = %v, want error %v", tc.size, tc.region, tc.extent, err, tc.wantErr)
			}
		})
	}
}

func TestNewTrackerPanicsOnBadGeometry(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("NewTracker with region size 3000 did not panic")
		}
	}()
	NewTracker(1*MiB, 3000)
}

func TestRegionRange(t *testing.T) {
	// 10 MiB + 1 KiB volume with 64 KiB regions: 161 regions, the last one
	// 1 KiB long.
	tr := NewTracker(10*MiB+1*KiB, 64*KiB)
	if got := tr.Regions(); got != 161 {
		t.Fatalf("Regions() = %d, want 161", got)
	}
	tests := []struct {
		name        string
		off, n      int64
		first, last uint32
		ok          bool
	}{
		{"firstByte", 0, 1, 0, 0, true},
		{"firstRegion", 0, 64 * KiB, 0, 0, true},
		{"endsOnBoundary", 60 * KiB, 4 * KiB, 0, 0, true},
		{"spansBoundary", 60 * KiB, 8 * KiB, 0, 1, true},
		{"startsOnBoundary", 64 * KiB, 1, 1, 1, true},
		{"spansMany", 100 * KiB, 1 * MiB, 1, 17, true},
		{"lastShortRegion", 10 * MiB, 1 * KiB, 160, 160, true},
		{"lastByte", 10*MiB + 1*KiB - 1, 1, 160, 160, true},
		{"pastEndClamped", 10*MiB - 1, 1 * MiB, 159, 160, true},
		{"hugeLengthClamped", 0, 1<<63 - 1, 0, 160, true},
		{"zeroLength", 4 * KiB, 0, 0, 0, false},
		{"negativeLength", 4 * KiB, -1, 0, 0, false},
		{"negativeOffset", -1, 10, 0, 0, false},
		{"atEnd", 10*MiB + 1*KiB, 1, 0, 0, false},
		{"beyondEnd", 20 * MiB, 1, 0, 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			first, last, ok := tr.RegionRange(tc.off, tc.n)
			if ok != tc.ok || (ok && (first != tc.first || last != tc.last)) {
				t.Fatalf("RegionRange(%d, %d) = (%d, %d, %v), want (%d, %d, %v)", tc.off, tc.n, first, last, ok, tc.first, tc.last, tc.ok)
			}
		})
	}
}

func TestBytesAndCount(t *testing.T) {
	tr := NewTracker(10*MiB+1*KiB, 64*KiB)
	if tr.Count() != 0 || tr.Bytes() != 0 {
		t.Fatalf("empty tracker: Count %d Bytes %d", tr.Count(), tr.Bytes())
	}
	tr.Mark(0, 1, 1)
	tr.Mark(64*KiB, 64*KiB, 2)
	if got, want := tr.Bytes(), 2*64*KiB; got != want {
		t.Fatalf("Bytes() = %d, want %d", got, want)
	}
	tr.Mark(10*MiB, 1, 3) // last region, 1 KiB long
	if got, want := tr.Bytes(), 2*64*KiB+1*KiB; got != want {
		t.Fatalf("Bytes() with short last region = %d, want %d", got, want)
	}
	if got := tr.Count(); got != 3 {
		t.Fatalf("Count() = %d, want 3", got)
	}
	// Exact multiple: no short region.
	tr2 := NewTracker(1*MiB, 64*KiB)
	tr2.Mark(1*MiB-1, 1, 1)
	if got := tr2.Bytes(); got != 64*KiB {
		t.Fatalf("Bytes() of full last region = %d, want %d", got, 64*KiB)
	}
}

// op is one step of a scripted Tracker scenario.
type op struct {
	kind   string // mark, regions, ack, lost, begin, done, clear
	off, n int64
	seq    uint64   // mark seq, ack upTo, done ackedSeq
	rs     []uint32 // regions for "regions"; region for begin/done in rs[0]
	tokIdx int      // done: 0 = the latest CopyBegin's token, k = the k-th one
	want   bool     // done: expected return
}

func TestTrackerSemantics(t *testing.T) {
	const R = 4 * KiB // regions of 4 KiB in a 64 KiB volume: 16 regions
	tests := []struct {
		name string
		ops  []op
		want []uint32
	}{
		{"markSetsBits", []op{{kind: "mark", off: 0, n: 1, seq: 1}, {kind: "mark", off: 3*R + 100, n: 2 * R, seq: 2}}, []uint32{0, 3, 4, 5}},
		{"ackClears", []op{{kind: "mark", off: 0, n: R, seq: 1}, {kind: "ack", seq: 1}}, nil},
		{"ackIsCumulative", []op{
			{kind: "mark", off: 0, n: R, seq: 1}, {kind: "mark", off: R, n: R, seq: 2}, {kind: "mark", off: 2 * R, n: R, seq: 3},
			{kind: "ack", seq: 2}}, []uint32{2}},
		{"ackBelowKeeps", []op{{kind: "mark", off: 0, n: R, seq: 5}, {kind: "ack", seq: 4}}, []uint32{0}},
		{"inFlightWriteToAckedRegionKeepsBit", []op{
			{kind: "mark", off: 0, n: 100, seq: 1}, {kind: "mark", off: 200, n: 100, seq: 2},
			{kind: "ack", seq: 1}}, []uint32{0}},
		{"thenSecondAckClears", []op{
			{kind: "mark", off: 0, n: 100, seq: 1}, {kind: "mark", off: 200, n: 100, seq: 2},
			{kind: "ack", seq: 1}, {kind: "ack", seq: 2}}, nil},
		{"spanningWritePartlyRewritten", []op{
			{kind: "mark", off: 0, n: 3 * R, seq: 1}, {kind: "mark", off: R, n: 10, seq: 2},
			{kind: "ack", seq: 1}}, []uint32{1}},
		{"markRegionsIsSticky", []op{
			{kind: "regions", rs: []uint32{2}}, {kind: "mark", off: 2 * R, n: 10, seq: 1}, {kind: "ack", seq: 1}}, []uint32{2}},
		{"markRegionsWhileInFlight", []op{
			{kind: "mark", off: 2 * R, n: 10, seq: 1}, {kind: "regions", rs: []uint32{2}}, {kind: "ack", seq: 1}}, []uint32{2}},
		{"markRegionsIgnoresOutOfRange", []op{{kind: "regions", rs: []uint32{15, 16, 1000}}}, []uint32{15}},
		{"peerLostKeepsInFlight", []op{
			{kind: "mark", off: 0, n: R, seq: 1}, {kind: "mark", off: R, n: R, seq: 2}, {kind: "ack", seq: 1},
			{kind: "lost"}, {kind: "ack", seq: 2}}, []uint32{1}},
		{"peerLostThenNewSeqsRestart", []op{
			{kind: "mark", off: 0, n: R, seq: 10}, {kind: "lost"},
			{kind: "mark", off: R, n: R, seq: 1}, {kind: "ack", seq: 1}}, []uint32{0}},
		{"lostRegionRewrittenAndAckedStaysDirty", []op{
			{kind: "mark", off: 0, n: R, seq: 10}, {kind: "lost"},
			{kind: "mark", off: 0, n: 10, seq: 1}, {kind: "ack", seq: 1}}, []uint32{0}},
		{"nonIncreasingSeqIsSticky", []op{
			{kind: "mark", off: 0, n: R, seq: 5}, {kind: "mark", off: R, n: R, seq: 5}, {kind: "ack", seq: 5}}, []uint32{1}},
		{"emptyAndOutsideIgnored", []op{
			{kind: "mark", off: 0, n: 0, seq: 1}, {kind: "mark", off: 64 * KiB, n: 10, seq: 2}}, nil},
		{"copyCleansSticky", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, seq: 0, want: true}}, nil},
		{"copyRacedBySeqWriteUnacked", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "mark", off: 3 * R, n: 10, seq: 7},
			{kind: "done", rs: []uint32{3}, seq: 6, want: false}, {kind: "ack", seq: 7}}, []uint32{3}},
		{"copyRacedBySeqWriteAcked", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "mark", off: 3 * R, n: 10, seq: 7}, {kind: "ack", seq: 7},
			{kind: "done", rs: []uint32{3}, seq: 7, want: true}}, nil},
		{"copyRacedByUnseqWrite", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "regions", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, seq: 100, want: false}}, []uint32{3}},
		{"copyOtherRegionWriteDoesNotMatter", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "mark", off: 4 * R, n: 10, seq: 7},
			{kind: "done", rs: []uint32{3}, seq: 0, want: true}}, []uint32{4}},
		{"copyWithOlderInFlightWriteWaitsForAck", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "mark", off: 3 * R, n: 10, seq: 7},
			{kind: "begin", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, seq: 6, want: false}, {kind: "ack", seq: 7}}, nil},
		{"copyWithOlderInFlightWriteLostStaysDirty", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "mark", off: 3 * R, n: 10, seq: 7},
			{kind: "begin", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, seq: 6, want: false}, {kind: "lost"}}, []uint32{3}},
		{"staleTokenRejected", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, tokIdx: 1, want: false}}, []uint32{3}},
		{"newestTokenAccepted", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, tokIdx: 2, want: true}}, nil},
		{"tokenReusedRejected", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, want: true},
			{kind: "regions", rs: []uint32{3}},
			{kind: "done", rs: []uint32{3}, want: false}}, []uint32{3}},
		{"peerLostInvalidatesCopy", []op{
			{kind: "regions", rs: []uint32{3}}, {kind: "begin", rs: []uint32{3}}, {kind: "lost"},
			{kind: "done", rs: []uint32{3}, want: false}}, []uint32{3}},
		{"clearKeepsInFlight", []op{
			{kind: "regions", rs: []uint32{1, 2}}, {kind: "mark", off: 5 * R, n: 1, seq: 1}, {kind: "mark", off: 6 * R, n: 1, seq: 2},
			{kind: "ack", seq: 1}, {kind: "clear"}}, []uint32{6}},
		{"clearThenAck", []op{
			{kind: "mark", off: 6 * R, n: 1, seq: 2}, {kind: "clear"}, {kind: "ack", seq: 2}}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := NewTracker(64*KiB, R)
			var tokens []CopyToken
			for i, o := range tc.ops {
				switch o.kind {
				case "mark":
					tr.Mark(o.off, o.n, o.seq)
				case "regions":
					tr.MarkRegions(roaring.BitmapOf(o.rs...))
				case "ack":
					tr.Acked(o.seq)
				case "lost":
					tr.PeerLost()
				case "clear":
					tr.Clear()
				case "begin":
					tokens = append(tokens, tr.CopyBegin(o.rs[0]))
				case "done":
					tok := tokens[len(tokens)-1]
					if o.tokIdx > 0 {
						tok = tokens[o.tokIdx-1]
					}
					if got := tr.CopyDone(o.rs[0], tok, o.seq); got != o.want {
						t.Fatalf("op %d: CopyDone(%d) = %v, want %v", i, o.rs[0], got, o.want)
					}
				default:
					t.Fatalf("bad op %q", o.kind)
				}
			}
			if got := tr.Dirty().ToArray(); !slices.Equal(got, tc.want) {
				t.Fatalf("dirty = %v, want %v", got, tc.want)
			}
			if got := tr.Count(); got != uint64(len(tc.want)) {
				t.Fatalf("Count() = %d, want %d", got, len(tc.want))
			}
		})
	}
}

func TestCopyBeginOutOfRange(t *testing.T) {
	tr := NewTracker(64*KiB, 4*KiB)
	if tok := tr.CopyBegin(16); tok != 0 {
		t.Fatalf("CopyBegin(16) on 16 regions = %d, want 0", tok)
	}
	if tr.CopyDone(16, 0, 0) {
		t.Fatal("CopyDone with the zero token succeeded")
	}
}

func TestDirtyIsACopy(t *testing.T) {
	tr := NewTracker(64*KiB, 4*KiB)
	tr.Mark(0, 1, 1)
	d := tr.Dirty()
	d.Add(5)
	if tr.IsDirty(5) {
		t.Fatal("modifying Dirty() changed the tracker")
	}
}

// refModel is the specification of Tracker written the obvious way: per
// region, the set of unacked seqs and a sticky flag.
type refModel struct {
	unacked map[uint32]map[uint64]bool
	sticky  map[uint32]bool
	copies  map[uint32]*refCopy
	lastSeq uint64
	anySeq  bool
}

type refCopy struct {
	tok     CopyToken
	tainted bool     // dirtied without seq since begin
	seqs    []uint64 // seqs written since begin
}

func newRefModel() *refModel {
	return &refModel{unacked: map[uint32]map[uint64]bool{}, sticky: map[uint32]bool{}, copies: map[uint32]*refCopy{}}
}

func (m *refModel) dirty(r uint32) bool { return m.sticky[r] || len(m.unacked[r]) > 0 }

func (m *refModel) mark(first, last uint32, seq uint64) {
	if m.anySeq && seq <= m.lastSeq {
		m.markSticky(first, last)
		return
	}
	m.lastSeq, m.anySeq = seq, true
	for r := first; r <= last; r++ {
		if m.unacked[r] == nil {
			m.unacked[r] = map[uint64]bool{}
		}
		m.unacked[r][seq] = true
		if c := m.copies[r]; c != nil {
			c.seqs = append(c.seqs, seq)
		}
	}
}

func (m *refModel) markSticky(first, last uint32) {
	for r := first; r <= last; r++ {
		m.sticky[r] = true
		if c := m.copies[r]; c != nil {
			c.tainted = true
		}
	}
}

func (m *refModel) ack(upTo uint64) {
	for _, s := range m.unacked {
		for seq := range s {
			if seq <= upTo {
				delete(s, seq)
			}
		}
	}
}

func (m *refModel) lost() {
	for r, s := range m.unacked {
		if len(s) > 0 {
			m.sticky[r] = true
		}
	}
	m.unacked = map[uint32]map[uint64]bool{}
	m.copies = map[uint32]*refCopy{}
	m.anySeq, m.lastSeq = false, 0
}

func (m *refModel) done(r uint32, tok CopyToken, acked uint64) bool {
	c := m.copies[r]
	if c == nil || c.tok != tok {
		return false
	}
	delete(m.copies, r)
	if c.tainted {
		return false
	}
	for _, s := range c.seqs {
		if s > acked {
			return false
		}
	}
	m.sticky[r] = false
	for s := range m.unacked[r] {
		if s <= acked {
			delete(m.unacked[r], s)
		}
	}
	return !m.dirty(r)
}

func (m *refModel) clear() {
	m.sticky = map[uint32]bool{}
	m.copies = map[uint32]*refCopy{}
}

// TestTrackerMatchesModel drives Tracker and refModel with the same random
// operations and compares the dirty sets after every step.
func TestTrackerMatchesModel(t *testing.T) {
	const regions = 24
	rng := rand.New(rand.NewPCG(1, 2))
	for iter := 0; iter < 60; iter++ {
		tr := NewTracker(regions*4*KiB-100, 4*KiB)
		m := newRefModel()
		var seq, acked uint64
		tokens := map[uint32]CopyToken{}
		for step := 0; step < 300; step++ {
			var desc string
			switch k := rng.IntN(100); {
			case k < 40:
				off := rng.Int64N(regions * 4 * KiB)
				n := rng.Int64N(3*4*KiB) + 1
				if rng.IntN(20) == 0 && seq > 0 {
					seq -= uint64(rng.IntN(2)) // occasionally a non-increasing seq
				} else {
					seq++
				}
				tr.Mark(off, n, seq)
				if first, last, ok := tr.RegionRange(off, n); ok {
					m.mark(first, last, seq)
				}
				desc = "mark"
			case k < 60:
				if seq > acked {
					acked += uint64(rng.IntN(int(seq-acked) + 1))
				}
				tr.Acked(acked)
				m.ack(acked)
				desc = "ack"
			case k < 66:
				r := uint32(rng.IntN(regions))
				tr.MarkRegions(roaring.BitmapOf(r))
				m.markSticky(r, r)
				desc = "regions"
			case k < 69:
				tr.PeerLost()
				m.lost()
				seq, acked = 0, 0
				desc = "lost"
			case k < 80:
				r := uint32(rng.IntN(regions))
				tok := tr.CopyBegin(r)
				tokens[r] = tok
				m.copies[r] = &refCopy{tok: tok}
				desc = "begin"
			case k < 98:
				r := uint32(rng.IntN(regions))
				tok := tokens[r]
				if rng.IntN(10) == 0 {
					tok++ // wrong token
				}
				ackedSeq := acked
				if seq > acked && rng.IntN(3) == 0 {
					ackedSeq = acked + uint64(rng.IntN(int(seq-acked)+1))
					tr.Acked(ackedSeq) // the caller's ackedSeq comes from real acks
					m.ack(ackedSeq)
					acked = ackedSeq
				}
				got, want := tr.CopyDone(r, tok, ackedSeq), m.done(r, tok, ackedSeq)
				if got != want {
					t.Fatalf("iter %d step %d: CopyDone(%d) = %v, model %v", iter, step, r, got, want)
				}
				desc = "done"
			default:
				tr.Clear()
				m.clear()
				desc = "clear"
			}
			for r := uint32(0); r < regions; r++ {
				if got, want := tr.IsDirty(r), m.dirty(r); got != want {
					t.Fatalf("iter %d step %d (%s): region %d dirty = %v, model %v", iter, step, desc, r, got, want)
				}
			}
		}
	}
}

// TestTrackerConcurrent runs writers, an acker, resync copies and readers in
// parallel (meant for -race) and then checks that no region with an unacked
// write or an unresolved sticky mark is clean.
func TestTrackerConcurrent(t *testing.T) {
	const regions = 256
	tr := NewTracker(regions*64*KiB, 64*KiB)

	var seqMu sync.Mutex // Mark's seq must increase: assign and mark under one lock
	var seq uint64
	written := make(map[uint32]uint64) // region -> highest seq written

	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			for i := 0; i < 3000; i++ {
				off := rng.Int64N(regions * 64 * KiB)
				seqMu.Lock()
				seq++
				tr.Mark(off, 4*KiB, seq)
				first, last, _ := tr.RegionRange(off, 4*KiB)
				for r := first; r <= last; r++ {
					written[r] = seq
				}
				seqMu.Unlock()
			}
		}(w)
	}
	var ackWG sync.WaitGroup
	ackWG.Add(3)
	var ackedMax uint64 // written by the acker only; read after ackWG.Wait
	go func() {         // acker: acks lag behind writes
		defer ackWG.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			seqMu.Lock()
			s := seq
			seqMu.Unlock()
			if s > 20 {
				tr.Acked(s - 20)
				ackedMax = s - 20
			}
		}
	}()
	go func() { // reader
		defer ackWG.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = tr.Dirty().GetCardinality()
			_ = tr.Bytes()
			_ = tr.InFlight()
		}
	}()
	go func() { // resync copies racing the writes
		defer ackWG.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			r := uint32(i % regions)
			tok := tr.CopyBegin(r)
			tr.CopyDone(r, tok, 0) // ackedSeq 0: must never clear a region with writes
		}
	}()
	wg.Wait()
	close(stop)
	ackWG.Wait()

	seqMu.Lock()
	final := seq
	seqMu.Unlock()
	acked := max(ackedMax, final-100)
	tr.Acked(acked)
	for r, s := range written {
		if got, want := tr.IsDirty(r), s > acked; got != want {
			t.Fatalf("region %d last written at seq %d, acked %d: dirty = %v, want %v", r, s, acked, got, want)
		}
	}
	tr.PeerLost()
	tr.Acked(final) // meaningless after PeerLost: must not clear anything
	for r, s := range written {
		if s > acked && !tr.IsDirty(r) {
			t.Fatalf("after PeerLost, region %d written at seq %d is clean", r, s)
		}
	}
	if tr.InFlight() != 0 {
		t.Fatalf("InFlight() = %d after PeerLost", tr.InFlight())
	}
}

func TestAckedQueueCompaction(t *testing.T) {
	tr := NewTracker(1*GiB, 64*KiB)
	// Keep a long window in flight so the queue head advances without
	// draining; compaction must not lose entries.
	const window = 3000
	for s := uint64(1); s <= 20000; s++ {
		tr.Mark(int64(s%16384)*64*KiB, 4*KiB, s)
		if s > window {
			tr.Acked(s - window)
		}
	}
	if got := tr.InFlight(); got != window {
		t.Fatalf("InFlight() = %d, want %d", got, window)
	}
	tr.Acked(20000)
	if tr.Count() != 0 || tr.InFlight() != 0 {
		t.Fatalf("after final ack: Count %d InFlight %d", tr.Count(), tr.InFlight())
	}
}
