package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
)

func TestCommands(t *testing.T) {
	const size = 1 << 20
	env := startServer(t, size, nil)
	c := connect(t, env.addr, testExport)
	m := env.mem
	if c.size != size {
		t.Fatalf("size %d", c.size)
	}

	t.Run("write and read", func(t *testing.T) {
		p := pattern(64<<10, 1)
		if e := c.writeAt(8192, p, 0); e != 0 {
			t.Fatalf("write errno %d", e)
		}
		got, e := c.readAt(8192, uint32(len(p)))
		if e != 0 {
			t.Fatalf("read errno %d", e)
		}
		assertBytes(t, "read back", got, p)
		assertBytes(t, "backend", m.Bytes()[8192:8192+len(p)], p)
	})
	t.Run("unaligned write and read", func(t *testing.T) {
		p := pattern(1001, 9)
		if e := c.writeAt(size-1001, p, 0); e != 0 {
			t.Fatalf("write errno %d", e)
		}
		got, _ := c.readAt(size-1001, 1001)
		assertBytes(t, "read back", got, p)
	})
	t.Run("FUA write is durable at reply, plain write only after FLUSH", func(t *testing.T) {
		plain, fua := pattern(4096, 20), pattern(4096, 40)
		if e := c.writeAt(100<<10, plain, 0); e != 0 {
			t.Fatal(e)
		}
		if e := c.writeAt(200<<10, fua, CmdFlagFUA); e != 0 {
			t.Fatal(e)
		}
		d := m.Durable()
		assertBytes(t, "FUA write durable", d[200<<10:200<<10+4096], fua)
		if bytes.Equal(d[100<<10:100<<10+4096], plain) {
			t.Fatal("plain write durable before FLUSH")
		}
		if r := c.do(CmdFlush, 0, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush errno %d", r.errno)
		}
		assertBytes(t, "plain write after FLUSH", m.Durable()[100<<10:100<<10+4096], plain)
	})
	t.Run("FLUSH with FUA flag", func(t *testing.T) {
		if r := c.do(CmdFlush, CmdFlagFUA, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush errno %d", r.errno)
		}
	})
	t.Run("READ with FUA flag", func(t *testing.T) {
		if r := c.do(CmdRead, CmdFlagFUA, 0, 512, nil); r.errno != 0 || len(r.data) != 512 {
			t.Fatalf("errno %d len %d", r.errno, len(r.data))
		}
	})
	t.Run("TRIM", func(t *testing.T) {
		c.writeAt(300<<10, pattern(8192, 5), 0)
		before := m.Calls(OpTrim)
		if r := c.do(CmdTrim, CmdFlagFUA, 300<<10, 8192, nil); r.errno != 0 {
			t.Fatalf("trim errno %d", r.errno)
		}
		if m.Calls(OpTrim) != before+1 {
			t.Fatal("backend Trim not called")
		}
		assertBytes(t, "trimmed durable", m.Durable()[300<<10:300<<10+8192], make([]byte, 8192))
	})
	t.Run("WRITE_ZEROES punches unless NO_HOLE", func(t *testing.T) {
		c.writeAt(400<<10, pattern(8192, 5), 0)
		z, p := m.Calls(OpWriteZeroes), m.Calls(OpPunchZeroes)
		if r := c.do(CmdWriteZeroes, 0, 400<<10, 4096, nil); r.errno != 0 {
			t.Fatalf("errno %d", r.errno)
		}
		if r := c.do(CmdWriteZeroes, CmdFlagNoHole|CmdFlagFUA, 404<<10, 4096, nil); r.errno != 0 {
			t.Fatalf("errno %d", r.errno)
		}
		if m.Calls(OpPunchZeroes) != p+1 || m.Calls(OpWriteZeroes) != z+1 {
			t.Fatalf("punch calls %d→%d, zero calls %d→%d", p, m.Calls(OpPunchZeroes), z, m.Calls(OpWriteZeroes))
		}
		got, _ := c.readAt(400<<10, 8192)
		assertBytes(t, "zeroed", got, make([]byte, 8192))
		assertBytes(t, "NO_HOLE|FUA zeroes durable", m.Durable()[404<<10:408<<10], make([]byte, 4096))
	})
	t.Run("zero-length requests", func(t *testing.T) {
		calls := m.Calls(OpRead) + m.Calls(OpWrite) + m.Calls(OpTrim) + m.Calls(OpPunchZeroes)
		for _, typ := range []uint16{CmdRead, CmdWrite, CmdTrim, CmdWriteZeroes} {
			if r := c.do(typ, 0, size, 0, nil); r.errno != 0 {
				t.Fatalf("%s: errno %d", CommandName(typ), r.errno)
			}
		}
		if now := m.Calls(OpRead) + m.Calls(OpWrite) + m.Calls(OpTrim) + m.Calls(OpPunchZeroes); now != calls {
			t.Fatal("zero-length requests reached the backend")
		}
	})
	t.Run("DISC finishes and closes", func(t *testing.T) {
		c.send(CmdDisc, 0, 0, 0, nil)
		if rest := c.expectClosed(); len(rest) != 0 {
			t.Fatalf("got % x after DISC", rest)
		}
	})
}

func TestInvalidRequests(t *testing.T) {
	const size = 1 << 20
	env := startServer(t, size, func(s *Server, _ *StaticExports) { s.MaxPayload = 256 << 10 })
	c := connect(t, env.addr, testExport)
	tests := []struct {
		name    string
		typ     uint16
		flags   uint16
		off     uint64
		length  uint32
		payload []byte
		errno   uint32
	}{
		{"read past end", CmdRead, 0, size - 512, 1024, nil, errnoEINVAL},
		{"read offset past end", CmdRead, 0, size + 1, 0, nil, errnoEINVAL},
		{"read offset overflow", CmdRead, 0, math.MaxUint64 - 10, 512, nil, errnoEINVAL},
		{"read above MaxPayload", CmdRead, 0, 0, 256<<10 + 1, nil, errnoEINVAL},
		{"write past end", CmdWrite, 0, size - 512, 1024, make([]byte, 1024), errnoENOSPC},
		{"write offset overflow", CmdWrite, 0, math.MaxUint64 - 10, 512, make([]byte, 512), errnoENOSPC},
		{"trim past end", CmdTrim, 0, size, 4096, nil, errnoENOSPC},
		{"write zeroes past end", CmdWriteZeroes, 0, size - 4096, 8192, nil, errnoENOSPC},
		{"unknown command", 42, 0, 0, 0, nil, errnoEINVAL},
		{"CACHE not offered", 5, 0, 0, 4096, nil, errnoEINVAL},
		{"BLOCK_STATUS not offered", 7, 0, 0, 4096, nil, errnoEINVAL},
		{"unknown flag on read", CmdRead, 1 << 9, 0, 512, nil, errnoEINVAL},
		{"NO_HOLE on write", CmdWrite, CmdFlagNoHole, 0, 512, make([]byte, 512), errnoEINVAL},
		{"DF on read", CmdRead, 1 << 2, 0, 512, nil, errnoEINVAL},
		{"FAST_ZERO on write zeroes", CmdWriteZeroes, 1 << 4, 0, 512, nil, errnoEINVAL},
		{"unknown flag on flush", CmdFlush, 1 << 1, 0, 0, nil, errnoEINVAL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := env.mem.Bytes()
			r := c.do(tc.typ, tc.flags, tc.off, tc.length, tc.payload)
			if r.errno != tc.errno {
				t.Fatalf("errno %d, want %d", r.errno, tc.errno)
			}
			if r.data != nil {
				t.Fatal("error reply carried data")
			}
			if !bytes.Equal(env.mem.Bytes(), before) {
				t.Fatal("refused request changed the backend")
			}
			// The connection keeps working (payloads were consumed).
			assertTransmission(t, c)
		})
	}
}

func TestMinBlockAlignment(t *testing.T) {
	env := startServer(t, 1<<20, func(_ *Server, e *StaticExports) {
		e.Add("ns/aligned", &Export{Backend: NewMemBackend(1 << 20), MinBlock: 512})
	})
	c := connect(t, env.addr, "ns/aligned")
	if r := c.do(CmdRead, 0, 100, 512, nil); r.errno != errnoEINVAL {
		t.Fatalf("unaligned offset: errno %d", r.errno)
	}
	if r := c.do(CmdWrite, 0, 512, 100, make([]byte, 100)); r.errno != errnoEINVAL {
		t.Fatalf("unaligned length: errno %d", r.errno)
	}
	if r := c.do(CmdWrite, 0, 512, 1024, make([]byte, 1024)); r.errno != 0 {
		t.Fatalf("aligned: errno %d", r.errno)
	}
}

func TestReadOnlyExport(t *testing.T) {
	env := startServer(t, 1<<20, func(_ *Server, e *StaticExports) {
		e.Add("ns/ro", &Export{Backend: NewMemBackend(1 << 20), ReadOnly: true})
	})
	c := connect(t, env.addr, "ns/ro")
	if c.flags&FlagReadOnly == 0 || c.flags&(FlagSendTrim|FlagSendWriteZeroes) != 0 {
		t.Fatalf("flags 0x%x", c.flags)
	}
	for _, tc := range []struct {
		typ     uint16
		length  uint32
		payload []byte
	}{
		{CmdWrite, 4096, make([]byte, 4096)},
		{CmdTrim, 4096, nil},
		{CmdWriteZeroes, 4096, nil},
	} {
		if r := c.do(tc.typ, 0, 0, tc.length, tc.payload); r.errno != errnoEPERM {
			t.Fatalf("%s: errno %d, want EPERM", CommandName(tc.typ), r.errno)
		}
	}
	if _, e := c.readAt(0, 4096); e != 0 {
		t.Fatalf("read errno %d", e)
	}
	if r := c.do(CmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatalf("flush errno %d", r.errno)
	}
}

func TestOversizeWriteClosesConnection(t *testing.T) {
	env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) { s.MaxPayload = 64 << 10 })
	other := connect(t, env.addr, testExport)
	c := connect(t, env.addr, testExport)
	// A request in flight before the bad one is still answered.
	hr := c.send(CmdRead, 0, 0, 4096, nil)
	h := c.send(CmdWrite, 0, 0, 64<<10+1, nil)
	byHandle := map[uint64]simpleReply{}
	for range 3 {
		r, err := c.recv()
		if err != nil {
			break
		}
		byHandle[r.handle] = r
	}
	// Replies may come in any order (the read runs concurrently with the
	// refusal of the write).
	if len(byHandle) != 2 || byHandle[h].errno != errnoEINVAL || byHandle[hr].errno != 0 {
		t.Fatalf("replies %+v", byHandle)
	}
	if _, ok := byHandle[hr]; !ok {
		t.Fatalf("no reply to the read in flight: %+v", byHandle)
	}
	env.logs.waitFor(t, "NBD_CMD_WRITE of 65537 bytes exceeds the maximum payload of 65536 bytes")
	// The server and its other connections keep working.
	assertTransmission(t, other)
	assertTransmission(t, connect(t, env.addr, testExport))
	if env.srv.Stats().ProtocolErrors != 1 {
		t.Fatalf("stats %+v", env.srv.Stats())
	}
}

func TestBadRequestMagic(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	c := connect(t, env.addr, testExport)
	assertTransmission(t, c)
	bad := encodeRequest(CmdRead, 0, 1, 0, 512)
	bad[0] ^= 0xff
	c.write(bad)
	if rest := c.expectClosed(); len(rest) != 0 {
		t.Fatalf("got % x before close", rest)
	}
	env.logs.waitFor(t, "bad request magic 0xda609513")
	assertTransmission(t, connect(t, env.addr, testExport))
}

// holdHook returns a hook that blocks operations matching match until
// release is closed or the request context ends, reporting each hold on
// started.
func holdHook(match func(op Op, off int64) bool, started chan<- struct{}, release <-chan struct{}) Hook {
	return func(ctx context.Context, op Op, off, n int64) error {
		if !match(op, off) {
			return nil
		}
		started <- struct{}{}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func TestRepliesOutOfOrder(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	started, release := make(chan struct{}, 1), make(chan struct{})
	env.mem.SetHook(holdHook(func(op Op, off int64) bool { return op == OpRead && off == 0 }, started, release))
	c := connect(t, env.addr, testExport)
	c.writeAt(8192, pattern(4096, 77), 0)
	slow := c.send(CmdRead, 0, 0, 4096, nil)
	<-started
	fast := c.send(CmdRead, 0, 8192, 4096, nil)
	r := c.mustRecv()
	if r.handle != fast {
		t.Fatalf("first reply for handle %d, want the fast read %d", r.handle, fast)
	}
	assertBytes(t, "fast read", r.data, pattern(4096, 77))
	close(release)
	if r := c.mustRecv(); r.handle != slow || r.errno != 0 || len(r.data) != 4096 {
		t.Fatalf("slow reply %d errno %d", r.handle, r.errno)
	}
}

func TestFlushWaitsForEarlierWrites(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	var (
		mu     sync.Mutex
		events []string
	)
	record := func(s string) {
		mu.Lock()
		events = append(events, s)
		mu.Unlock()
	}
	started, release := make(chan struct{}, 1), make(chan struct{})
	hold := holdHook(func(op Op, off int64) bool { return op == OpWrite && off == 0 }, started, release)
	env.mem.SetHook(func(ctx context.Context, op Op, off, n int64) error {
		if op == OpFlush {
			record("flush")
		}
		err := hold(ctx, op, off, n)
		if op == OpWrite {
			record(fmt.Sprintf("write@%d", off))
		}
		return err
	})
	c := connect(t, env.addr, testExport)

	// A FLUSH received before a held write does not wait for it.
	fl := c.send(CmdFlush, 0, 0, 0, nil)
	if r := c.mustRecv(); r.handle != fl || r.errno != 0 {
		t.Fatalf("flush reply %+v", r)
	}
	w := c.send(CmdWrite, 0, 0, 4096, pattern(4096, 1))
	<-started
	other := c.send(CmdWrite, 0, 8192, 4096, pattern(4096, 2))
	if r := c.mustRecv(); r.handle != other {
		t.Fatalf("reply %+v", r)
	}
	// A FLUSH received after it waits, even though another write finished.
	fl = c.send(CmdFlush, 0, 0, 0, nil)
	time.Sleep(100 * time.Millisecond)
	if n := env.mem.Calls(OpFlush); n != 1 {
		t.Fatalf("backend Flush called %d times while an earlier write was held", n)
	}
	close(release)
	got := map[uint64]uint32{}
	for range 2 {
		r := c.mustRecv()
		got[r.handle] = r.errno
	}
	if len(got) != 2 || got[w] != 0 || got[fl] != 0 {
		t.Fatalf("replies %v", got)
	}
	mu.Lock()
	defer mu.Unlock()
	want := "[flush write@8192 write@0 flush]"
	if s := fmt.Sprint(events); s != want {
		t.Fatalf("backend saw %s, want %s", s, want)
	}
	assertBytes(t, "durable after flush", env.mem.Durable()[:4096], pattern(4096, 1))
}

func TestPipelinedBackpressure(t *testing.T) {
	const size = 4 << 20
	env := startServer(t, size, func(s *Server, _ *StaticExports) {
		s.MaxInFlight = 4
		s.MaxInFlightBytes = 64 << 10
	})
	var cur, peak, curBytes, peakBytes atomic.Int64
	raise := func(peak *atomic.Int64, v int64) {
		for {
			p := peak.Load()
			if v <= p || peak.CompareAndSwap(p, v) {
				return
			}
		}
	}
	env.mem.SetHook(func(ctx context.Context, op Op, off, n int64) error {
		raise(&peak, cur.Add(1))
		if op == OpWrite {
			raise(&peakBytes, curBytes.Add(n))
			defer curBytes.Add(-n)
		}
		time.Sleep(100 * time.Microsecond)
		cur.Add(-1)
		return nil
	})
	c := connect(t, env.addr, testExport)
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	// Writes in flight together may run in any order (NBD defines none for
	// overlapping requests), so each write gets its own 32 KiB slot.
	const n = size / (32 << 10)
	slots := rng.Perm(n)
	sent := make(chan error, 1)
	handles := make(map[uint64]bool)
	var hmu sync.Mutex
	go func() {
		for i := range n {
			off := uint64(slots[i]) * (32 << 10)
			l := (rng.Uint32N(8) + 1) * 4096
			p := make([]byte, l)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			copy(want[off:], p)
			hmu.Lock()
			handles[c.send(CmdWrite, 0, off, l, p)] = true
			hmu.Unlock()
		}
		sent <- nil
	}()
	for range n {
		r := c.mustRecv()
		hmu.Lock()
		ok := handles[r.handle]
		delete(handles, r.handle)
		hmu.Unlock()
		if !ok || r.errno != 0 {
			t.Fatalf("unexpected reply %+v", r)
		}
	}
	<-sent
	if p := peak.Load(); p > 4 || p < 2 {
		t.Fatalf("peak concurrency %d, want 2..4", p)
	}
	if p := peakBytes.Load(); p > 64<<10 {
		t.Fatalf("peak write bytes in flight %d, want at most 64 KiB", p)
	}
	// Pipelined reads of the whole volume.
	for off := uint64(0); off < size; off += 256 << 10 {
		c.send(CmdRead, 0, off, 256<<10, nil)
	}
	got := make([]byte, size)
	for range size / (256 << 10) {
		r := c.mustRecv()
		if r.errno != 0 {
			t.Fatalf("read errno %d", r.errno)
		}
		copy(got[(r.handle-n-1)*(256<<10):], r.data)
	}
	assertBytes(t, "volume", got, want)
}

func TestBackendErrorMapping(t *testing.T) {
	for _, tc := range []struct {
		err   error
		errno uint32
	}{
		{nil, 0},
		{syscall.ENOSPC, errnoENOSPC},
		{fmt.Errorf("extent: %w", syscall.EDQUOT), errnoENOSPC},
		{syscall.EPERM, errnoEPERM},
		{ErrReadOnly, errnoEPERM},
		{syscall.EROFS, errnoEPERM},
		{fmt.Errorf("bad: %w", syscall.EINVAL), errnoEINVAL},
		{context.Canceled, errnoESHUTDOWN},
		{fmt.Errorf("held: %w", context.Canceled), errnoESHUTDOWN},
		{ErrShuttingDown, errnoESHUTDOWN},
		{syscall.ENOMEM, errnoENOMEM},
		{syscall.EOVERFLOW, errnoEOVERFLOW},
		{syscall.ENOTSUP, errnoENOTSUP},
		{syscall.EIO, errnoEIO},
		{errors.New("disk on fire"), errnoEIO},
		{context.DeadlineExceeded, errnoEIO},
	} {
		if got := errnoFor(tc.err); got != tc.errno {
			t.Errorf("errnoFor(%v) = %d, want %d", tc.err, got, tc.errno)
		}
	}

	// End to end, through fault injection.
	env := startServer(t, 1<<20, nil)
	var fault atomic.Pointer[error]
	env.mem.SetHook(func(ctx context.Context, op Op, off, n int64) error {
		if e := fault.Load(); e != nil && op != OpRead {
			return *e
		}
		return nil
	})
	c := connect(t, env.addr, testExport)
	for _, tc := range []struct {
		err   error
		typ   uint16
		errno uint32
	}{
		{syscall.ENOSPC, CmdWrite, errnoENOSPC},
		{syscall.EPERM, CmdTrim, errnoEPERM},
		{syscall.EIO, CmdFlush, errnoEIO},
		{errors.New("replica gone"), CmdWriteZeroes, errnoEIO},
	} {
		fault.Store(&tc.err)
		var p []byte
		length := uint32(4096)
		switch tc.typ {
		case CmdWrite:
			p = make([]byte, length)
		case CmdFlush:
			length = 0
		}
		if r := c.do(tc.typ, 0, 0, length, p); r.errno != tc.errno {
			t.Errorf("%s with %v: errno %d, want %d", CommandName(tc.typ), tc.err, r.errno, tc.errno)
		}
	}
	fault.Store(nil)
	env.logs.waitFor(t, "replica gone")
	if st := env.srv.Stats(); st.Write.Errors != 1 || st.Trim.Errors != 1 || st.Flush.Errors != 1 || st.WriteZeroes.Errors != 1 {
		t.Fatalf("stats %+v", st)
	}
	assertTransmission(t, c)
}

func TestDisconnectCancelsHeldWrite(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	started := make(chan struct{}, 1)
	causes := make(chan error, 1)
	env.mem.SetHook(func(ctx context.Context, op Op, off, n int64) error {
		if op != OpWrite {
			return nil
		}
		started <- struct{}{}
		<-ctx.Done() // held until the client goes away
		causes <- context.Cause(ctx)
		return ctx.Err()
	})
	c := connect(t, env.addr, testExport)
	c.send(CmdWrite, 0, 0, 4096, make([]byte, 4096))
	<-started
	c.c.Close()
	select {
	case cause := <-causes:
		if !errors.Is(cause, ErrDisconnected) {
			t.Fatalf("cause %v, want ErrDisconnected", cause)
		}
	case <-time.After(testTimeout):
		t.Fatal("held write not cancelled after the client disconnected")
	}
	waitStats(t, env.srv, func(s Stats) bool { return s.ConnsActive == 0 })
}

func TestDiscFinishesInFlight(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	started, release := make(chan struct{}, 1), make(chan struct{})
	env.mem.SetHook(holdHook(func(op Op, _ int64) bool { return op == OpWrite }, started, release))
	c := connect(t, env.addr, testExport)
	h := c.send(CmdWrite, 0, 0, 4096, pattern(4096, 5))
	<-started
	c.send(CmdDisc, 0, 0, 0, nil)
	time.Sleep(50 * time.Millisecond)
	close(release)
	if r := c.mustRecv(); r.handle != h || r.errno != 0 {
		t.Fatalf("reply %+v", r)
	}
	c.expectClosed()
	assertBytes(t, "written", env.mem.Bytes()[:4096], pattern(4096, 5))
}

func TestShutdownDrainsInFlight(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	started, release := make(chan struct{}, 1), make(chan struct{})
	env.mem.SetHook(holdHook(func(op Op, _ int64) bool { return op == OpWrite }, started, release))
	c := connect(t, env.addr, testExport)
	h := c.send(CmdWrite, 0, 0, 4096, pattern(4096, 6))
	<-started
	env.cancel()
	time.Sleep(100 * time.Millisecond)
	// New connections are refused while the old one drains.
	if nc, err := dialQuick(env.addr); err == nil {
		nc.Close()
		t.Fatal("new connection accepted during shutdown")
	}
	close(release)
	if r := c.mustRecv(); r.handle != h || r.errno != 0 {
		t.Fatalf("reply %+v", r)
	}
	c.expectClosed()
	if err := env.stop(); err != nil {
		t.Fatal(err)
	}
}

func TestShutdownDrainTimeout(t *testing.T) {
	env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) { s.DrainTimeout = 200 * time.Millisecond })
	started := make(chan struct{}, 1)
	env.mem.SetHook(holdHook(func(op Op, _ int64) bool { return op == OpWrite }, started, nil))
	c := connect(t, env.addr, testExport)
	h := c.send(CmdWrite, 0, 0, 4096, make([]byte, 4096))
	<-started
	start := time.Now()
	env.cancel()
	if r := c.mustRecv(); r.handle != h || r.errno != errnoESHUTDOWN {
		t.Fatalf("reply %+v, want ESHUTDOWN", r)
	}
	c.expectClosed()
	if err := env.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 200*time.Millisecond || d > 5*time.Second {
		t.Fatalf("shutdown took %v", d)
	}
	env.logs.waitFor(t, "Drain timeout")
}

func TestProtocolErrorDrainTimeout(t *testing.T) {
	env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) { s.DrainTimeout = 200 * time.Millisecond })
	started := make(chan struct{}, 1)
	env.mem.SetHook(holdHook(func(op Op, _ int64) bool { return op == OpWrite }, started, nil))
	c := connect(t, env.addr, testExport)
	h := c.send(CmdWrite, 0, 0, 4096, make([]byte, 4096))
	<-started
	c.write(make([]byte, requestHeaderSize)) // bad magic
	if r := c.mustRecv(); r.handle != h || r.errno != errnoESHUTDOWN {
		t.Fatalf("reply %+v, want ESHUTDOWN", r)
	}
	c.expectClosed()
	env.logs.waitFor(t, "bad request magic 0x00000000")
	env.mem.SetHook(nil)
	assertTransmission(t, connect(t, env.addr, testExport))
}

func TestClientNotReadingRepliesIsDropped(t *testing.T) {
	env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) { s.WriteTimeout = 200 * time.Millisecond })
	c := connect(t, env.addr, testExport)
	// 48 MiB of replies, far more than the socket buffers hold.
	for range 48 {
		c.send(CmdRead, 0, 0, 1<<20, nil)
	}
	env.logs.waitFor(t, "i/o timeout")
	waitStats(t, env.srv, func(s Stats) bool { return s.ConnsActive == 0 })
	c.expectClosed()
}

func TestMultiConn(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	a := connect(t, env.addr, testExport)
	b := connect(t, env.addr, testExport)
	if a.flags&FlagCanMultiConn == 0 {
		t.Fatalf("flags 0x%x", a.flags)
	}
	var wg sync.WaitGroup
	for i, c := range []*testClient{a, b} {
		wg.Go(func() {
			for j := range 16 {
				off := uint64(i*(512<<10) + j*4096)
				c.send(CmdWrite, 0, off, 4096, pattern(4096, byte(i*16+j)))
			}
		})
	}
	wg.Wait()
	for _, c := range []*testClient{a, b} {
		for range 16 {
			if r := c.mustRecv(); r.errno != 0 {
				t.Fatalf("errno %d", r.errno)
			}
		}
	}
	// A flush on one connection covers writes completed on the other.
	if r := a.do(CmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatal(r.errno)
	}
	d := env.mem.Durable()
	for i := range 2 {
		for j := range 16 {
			off := i*(512<<10) + j*4096
			assertBytes(t, "durable", d[off:off+4096], pattern(4096, byte(i*16+j)))
		}
	}
	got, _ := a.readAt(512<<10, 4096)
	assertBytes(t, "cross-connection read", got, pattern(4096, 16))
}

func TestStats(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	c := connect(t, env.addr, testExport)
	c.writeAt(0, make([]byte, 8192), 0)
	c.readAt(0, 4096)
	c.readAt(0, 4096)
	c.do(CmdFlush, 0, 0, 0, nil)
	c.do(CmdTrim, 0, 0, 4096, nil)
	c.do(CmdWriteZeroes, 0, 0, 4096, nil)
	c.do(99, 0, 0, 0, nil)
	c.do(CmdRead, 0, 1<<20, 1, nil)
	c.send(CmdDisc, 0, 0, 0, nil)
	c.expectClosed()
	waitStats(t, env.srv, func(s Stats) bool { return s.ConnsActive == 0 })
	st := env.srv.Stats()
	want := Stats{
		Read:        CommandStats{Requests: 3, Bytes: 8192, Errors: 1},
		Write:       CommandStats{Requests: 1, Bytes: 8192},
		Flush:       CommandStats{Requests: 1},
		Trim:        CommandStats{Requests: 1, Bytes: 4096},
		WriteZeroes: CommandStats{Requests: 1, Bytes: 4096},
		Disc:        CommandStats{Requests: 1},
		Other:       CommandStats{Requests: 1, Errors: 1},
		ConnsTotal:  1,
	}
	if st != want {
		t.Fatalf("stats\n%+v, want\n%+v", st, want)
	}
}

func TestServeConnDirect(t *testing.T) {
	exports := &StaticExports{}
	exports.Add(testExport, &Export{Backend: NewMemBackend(1 << 20)})
	s := &Server{Exports: exports}
	t.Run("clean disconnect returns nil", func(t *testing.T) {
		cli, srv := netPipe()
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(context.Background(), srv) }()
		c := &testClient{t: t, c: cli, br: newReader(cli), readLens: map[uint64]uint32{}}
		_ = cli.SetDeadline(time.Now().Add(testTimeout))
		c.greeting()
		c.clientFlags(clientFixedNewstyle)
		c.goExport(testExport)
		assertTransmission(t, c)
		c.send(CmdDisc, 0, 0, 0, nil)
		if err := waitErr(t, done); err != nil {
			t.Fatalf("ServeConn: %v", err)
		}
	})
	t.Run("protocol error is returned", func(t *testing.T) {
		cli, srv := netPipe()
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(context.Background(), srv) }()
		go func() { _, _ = io.Copy(io.Discard, cli) }()
		_, _ = cli.Write([]byte{0, 0, 0, 1 << 6})
		if err := waitErr(t, done); !errors.Is(err, ErrProtocol) {
			t.Fatalf("ServeConn: %v, want ErrProtocol", err)
		}
	})
	t.Run("context cancel during handshake", func(t *testing.T) {
		cli, srv := netPipe()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(ctx, srv) }()
		go func() { _, _ = io.Copy(io.Discard, cli) }()
		time.Sleep(20 * time.Millisecond)
		cancel()
		if err := waitErr(t, done); err != nil {
			t.Fatalf("ServeConn: %v", err)
		}
	})
}

func waitErr(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(testTimeout):
		t.Fatal("ServeConn did not return")
		return nil
	}
}

func waitStats(t *testing.T, s *Server, ok func(Stats) bool) {
	t.Helper()
	testkit.Eventually(t, testTimeout, "the expected server stats", func() (bool, string) {
		st := s.Stats()
		return ok(st), fmt.Sprintf("%+v", st)
	}, testkit.Every(5*time.Millisecond))
}
