package volume_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// BenchmarkPairWrite measures client writes through a primary that mirrors
// to a backup over loopback TCP (in-memory stores), at queue depth qd. The
// file/ cases use real files in the test's temporary directory (the agent's
// path: page cache, fdatasync on the backup, journal group commits), for
// -cpuprofile, -blockprofile and -mutexprofile of the write path:
//
//	go test -run '^$' -bench 'PairWrite/file' -blockprofile block.out ./dataplane/volume/
func BenchmarkPairWrite(b *testing.B) {
	for _, files := range []bool{false, true} {
		prefix := ""
		if files {
			prefix = "file/"
		}
		benchmarkPairWrite(b, prefix, files)
	}
}

func benchmarkPairWrite(b *testing.B, prefix string, files bool) {
	for _, tc := range []struct {
		name string
		mode volume.Mode
		bs   int
		qd   int
		solo bool
	}{
		{"standalone/4K-qd32", volume.ModeAsync, 4096, 32, true},
		{"async/4K-qd32", volume.ModeAsync, 4096, 32, false},
		{"sync/4K-qd32", volume.ModeSync, 4096, 32, false},
		{"standalone/1M-qd8", volume.ModeAsync, 1 << 20, 8, true},
		{"async/1M-qd8", volume.ModeAsync, 1 << 20, 8, false},
		{"sync/1M-qd8", volume.ModeSync, 1 << 20, 8, false},
	} {
		b.Run(prefix+tc.name, func(b *testing.B) {
			newM := newMember
			if files {
				newM = newFileMember
			}
			p, bk := newM(b, "a"), newM(b, "b")
			spec := volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: tc.mode}
			if !tc.solo {
				if err := bk.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: tc.mode}); err != nil {
					b.Fatal(err)
				}
				spec.PeerNode, spec.PeerAddress = "b", bk.addr
			}
			if err := p.v.Apply(spec); err != nil {
				b.Fatal(err)
			}
			if !tc.solo {
				waitFor(b, "link up", func() bool { return p.v.Status().PeerConnected })
			}
			var next atomic.Int64
			slots := int64(size / tc.bs)
			b.SetBytes(int64(tc.bs))
			b.ResetTimer()
			var wg sync.WaitGroup
			for w := 0; w < tc.qd; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, tc.bs)
					for {
						i := next.Add(1)
						if i > int64(b.N) {
							return
						}
						off := ((i * 7919) % slots) * int64(tc.bs)
						if err := p.v.WriteAt(context.Background(), buf, off, false); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
		})
	}
}

// newFileMember is newMember with the replica in a real (sparse) file.
func newFileMember(t testing.TB, node string) *member {
	t.Helper()
	m := &member{logs: &syncBuf{}}
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: node, Dir: t.TempDir(), Size: size, RegionSize: region,
		Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	m.v = v
	ln := serveReplication(t, v)
	m.addr = ln.Addr().String()
	t.Cleanup(func() {
		ln.Close()
		if err := v.Close(); err != nil {
			t.Error(err)
		}
	})
	return m
}
