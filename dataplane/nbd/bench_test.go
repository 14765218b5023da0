package nbd

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// benchmarkWrite measures write throughput through the server over loopback
// TCP into a MemBackend, with qd requests in flight. The client is minimal
// (one writev per request, replies read in bulk) so the figures mostly
// reflect the server.
func benchmarkWrite(b *testing.B, bs, qd int) {
	const size = 64 << 20
	env := startServer(b, size, nil)
	c := connect(b, env.addr, testExport)
	_ = c.c.SetDeadline(time.Time{})
	payload := pattern(bs, 1)
	slots := make(chan struct{}, qd)
	errc := make(chan error, 1)
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	go func() {
		var rh [replyHeaderSize]byte
		for range b.N {
			if _, err := io.ReadFull(c.br, rh[:]); err != nil {
				errc <- err
				return
			}
			if e := binary.BigEndian.Uint32(rh[4:8]); e != 0 {
				errc <- io.ErrUnexpectedEOF
				return
			}
			<-slots
		}
		errc <- nil
	}()
	hdr := encodeRequest(CmdWrite, 0, 0, 0, uint32(bs))
	var iov [2][]byte
	bufs := new(net.Buffers)
	for i := range b.N {
		slots <- struct{}{}
		binary.BigEndian.PutUint64(hdr[8:16], uint64(i))
		binary.BigEndian.PutUint64(hdr[16:24], uint64(i*bs)%size)
		iov[0], iov[1] = hdr, payload
		*bufs = iov[:]
		if _, err := bufs.WriteTo(c.c); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "iops")
}

func BenchmarkWrite4K(b *testing.B) { benchmarkWrite(b, 4<<10, 32) }
func BenchmarkWrite1M(b *testing.B) { benchmarkWrite(b, 1<<20, 8) }
