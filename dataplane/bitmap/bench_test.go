package bitmap

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
)

// BenchmarkMarkAck is the per-write cost of dirty tracking: Mark of a 4 KiB
// write at a random offset of a 1 TiB volume plus the Acked that retires it,
// with a window of 64 writes in flight.
func BenchmarkMarkAck(b *testing.B) {
	for _, rs := range []int64{4 * KiB, 64 * KiB} {
		b.Run(fmt.Sprintf("region=%dK", rs/KiB), func(b *testing.B) {
			const window = 64
			tr := NewTracker(1*TiB, rs)
			rng := rand.New(rand.NewPCG(1, 1))
			offs := make([]int64, 1<<16)
			for i := range offs {
				offs[i] = rng.Int64N(1*TiB/(4*KiB)) * 4 * KiB
			}
			b.ReportAllocs()
			b.ResetTimer()
			cpu := startCPU()
			for i := 0; i < b.N; i++ {
				seq := uint64(i) + 1
				tr.Mark(offs[i&(len(offs)-1)], 4*KiB, seq)
				if seq > window {
					tr.Acked(seq - window)
				}
			}
			cpu.report(b)
		})
	}
}

// BenchmarkMarkAckContended: the writer marks while a second goroutine, like
// the link's ack reader, applies cumulative acks (one per 16 frames) under
// the same mutex. ns/op is per write.
func BenchmarkMarkAckContended(b *testing.B) {
	tr := NewTracker(1*TiB, 64*KiB)
	rng := rand.New(rand.NewPCG(1, 1))
	offs := make([]int64, 1<<16)
	for i := range offs {
		offs[i] = rng.Int64N(1*TiB/(4*KiB)) * 4 * KiB
	}
	acks := make(chan uint64, 1024)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for upTo := range acks {
			tr.Acked(upTo)
		}
	}()
	b.ResetTimer()
	cpu := startCPU()
	for i := 0; i < b.N; i++ {
		seq := uint64(i) + 1
		tr.Mark(offs[i&(len(offs)-1)], 4*KiB, seq)
		if seq%16 == 0 && seq > 64 {
			acks <- seq - 64
		}
	}
	close(acks)
	<-stopped
	cpu.report(b)
}

// BenchmarkBitmapMemory reports the size of a 1 TiB volume's dirty bitmap
// for 4 KiB and 64 KiB regions, 1 % and 50 % dirty, randomly or in clusters
// of 1 MiB (4 KiB regions) / 16 MiB (64 KiB regions). mem-B is roaring's
// in-memory size as built by Tracker-style Adds; opt-mem-B after
// RunOptimize; ckpt-B is the serialized size a checkpoint writes.
func BenchmarkBitmapMemory(b *testing.B) {
	for _, rs := range []int64{4 * KiB, 64 * KiB} {
		for _, pct := range []float64{1, 50} {
			for _, layout := range []string{"random", "clustered"} {
				name := fmt.Sprintf("region=%dK/dirty=%g%%/%s", rs/KiB, pct, layout)
				b.Run(name, func(b *testing.B) {
					regions := uint32(1 * TiB / rs)
					var before, after runtime.MemStats
					runtime.GC()
					runtime.ReadMemStats(&before)
					bm := buildBitmap(regions, pct/100, layout == "clustered", 42)
					runtime.GC()
					runtime.ReadMemStats(&after)
					mem := bm.GetSizeInBytes()
					heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
					opt := bm.Clone()
					opt.RunOptimize()
					b.ResetTimer()
					var s uint64
					for i := 0; i < b.N; i++ {
						s += bm.GetSizeInBytes()
					}
					b.StopTimer()
					b.ReportMetric(float64(bm.GetCardinality()), "regions")
					b.ReportMetric(float64(mem), "mem-B")
					b.ReportMetric(float64(heap), "heap-B")
					b.ReportMetric(float64(opt.GetSizeInBytes()), "opt-mem-B")
					b.ReportMetric(float64(opt.GetSerializedSizeInBytes()), "ckpt-B")
					runtime.KeepAlive(bm)
				})
			}
		}
	}
}

// buildBitmap returns a bitmap over regions with about frac of them set,
// either independently at random or as aligned clusters of 256 regions.
func buildBitmap(regions uint32, frac float64, clustered bool, seed uint64) *roaring.Bitmap {
	rng := rand.New(rand.NewPCG(seed, 0))
	bm := roaring.New()
	if clustered {
		const cluster = 256
		chunks := regions / cluster
		for c := uint32(0); c < chunks; c++ {
			if rng.Float64() < frac {
				bm.AddRange(uint64(c)*cluster, uint64(c+1)*cluster)
			}
		}
		return bm
	}
	if frac >= 0.25 {
		// Dense: build 64 regions at a time.
		words := make([]uint64, (regions+63)/64)
		for i := range words {
			var w uint64
			for bit := 0; bit < 64; bit++ {
				if rng.Float64() < frac {
					w |= 1 << bit
				}
			}
			words[i] = w
		}
		return roaring.FromDense(words, false)
	}
	// Sparse: geometric gaps.
	buf := make([]uint32, 0, 1<<16)
	pos := -1.0
	for {
		pos += 1 + math.Floor(math.Log(1-rng.Float64())/math.Log(1-frac))
		if pos >= float64(regions) {
			break
		}
		buf = append(buf, uint32(pos))
		if len(buf) == cap(buf) {
			bm.AddMany(buf)
			buf = buf[:0]
		}
	}
	bm.AddMany(buf)
	return bm
}

// BenchmarkOr1TiB4K is the resync merge: OR of two 1 TiB bitmaps with 4 KiB
// regions and 1 % of regions dirty on each side.
func BenchmarkOr1TiB4K(b *testing.B) {
	regions := uint32(1 * TiB / (4 * KiB))
	x := buildBitmap(regions, 0.01, false, 1)
	y := buildBitmap(regions, 0.01, false, 2)
	b.ResetTimer()
	cpu := startCPU()
	var card uint64
	for i := 0; i < b.N; i++ {
		card = roaring.Or(x, y).GetCardinality()
	}
	b.StopTimer()
	cpu.report(b)
	b.ReportMetric(float64(b.Elapsed().Microseconds())/1e3/float64(b.N), "ms/op")
	b.ReportMetric(float64(card), "regions")
}

// BenchmarkTrackerOr1TiB4K is the same merge through Tracker.Or (sticky
// merge into a tracker holding one side).
func BenchmarkTrackerOr1TiB4K(b *testing.B) {
	regions := uint32(1 * TiB / (4 * KiB))
	x := buildBitmap(regions, 0.01, false, 1)
	y := buildBitmap(regions, 0.01, false, 2)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		tr := NewTracker(1*TiB, 4*KiB)
		tr.Or(x)
		b.StartTimer()
		tr.Or(y)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Microseconds())/1e3/float64(b.N), "ms/op")
}

func benchJournal(b *testing.B, size, region, extent int64) *Journal {
	j, _, err := OpenJournal(b.TempDir(), size, region, extent, testLogger(b))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { j.Close(nil) })
	return j
}

// BenchmarkJournalMarkHot is the common case: the write's extent is already
// marked in this generation, so Mark must not lock or do I/O.
func BenchmarkJournalMarkHot(b *testing.B) {
	b.Run("serial", func(b *testing.B) {
		j := benchJournal(b, 1*TiB, 64*KiB, 4*MiB)
		ctx := context.Background()
		if err := j.Mark(ctx, 0, 4*MiB); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		b.ResetTimer()
		cpu := startCPU()
		for i := 0; i < b.N; i++ {
			if err := j.Mark(ctx, int64(i&1023)*4*KiB, 4*KiB); err != nil {
				b.Fatal(err)
			}
		}
		cpu.report(b)
	})
	b.Run("parallel", func(b *testing.B) {
		// Each goroutine writes its own extent, like writers of different
		// files; all 64 extents are marked beforehand.
		j := benchJournal(b, 1*TiB, 64*KiB, 4*MiB)
		ctx := context.Background()
		if err := j.Mark(ctx, 0, 64*4*MiB); err != nil {
			b.Fatal(err)
		}
		var goroutines atomic.Int64
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			base := (goroutines.Add(1) % 64) * 4 * MiB
			i := 0
			for pb.Next() {
				if err := j.Mark(ctx, base+int64(i&1023)*4*KiB, 4*KiB); err != nil {
					b.Error(err)
					return
				}
				i++
			}
		})
	})
}

// BenchmarkJournalMarkCold: every Mark hits a fresh extent and must wait for
// a group commit. With many parallel callers the fsyncs are shared:
// fsyncs/op is log fdatasyncs per Mark.
func BenchmarkJournalMarkCold(b *testing.B) {
	for _, callers := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			const ext = 64 * KiB
			j := benchJournal(b, 1*TiB, 64*KiB, ext)
			ctx := context.Background()
			var next atomic.Int64
			procs := runtime.GOMAXPROCS(0)
			b.SetParallelism((callers + procs - 1) / procs)
			before := j.Stats()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					e := next.Add(1) % (1 * TiB / ext)
					if err := j.Mark(ctx, e*ext, 4*KiB); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			s := j.Stats()
			b.ReportMetric(float64(s.Records-before.Records)/float64(b.N), "fsyncs/op")
			b.ReportMetric(float64(s.Batched-before.Batched)/math.Max(1, float64(s.Records-before.Records)), "marks/fsync")
		})
	}
}
