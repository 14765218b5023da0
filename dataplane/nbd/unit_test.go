package nbd

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

func netPipe() (client, server net.Conn) { return net.Pipe() }

func newReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

// dialQuick tries one connection without retrying.
func dialQuick(addr string) (net.Conn, error) {
	return net.DialTimeout("tcp", addr, time.Second)
}

func TestFlushBarrier(t *testing.T) {
	isDone := func(c <-chan struct{}) bool {
		select {
		case <-c:
			return true
		default:
			return false
		}
	}
	b := newFlushBarrier()
	if !isDone(b.seal()) {
		t.Fatal("flush with no writes waits")
	}
	w1 := b.begin()
	w2 := b.begin()
	f1 := b.seal()
	w3 := b.begin()
	f2 := b.seal()
	w4 := b.begin()
	if isDone(f1) || isDone(f2) {
		t.Fatal("flushes done with writes pending")
	}
	b.end(w3) // newer write done first: f2 still waits for w1, w2
	if isDone(f2) {
		t.Fatal("f2 done before older writes")
	}
	b.end(w1)
	if isDone(f1) {
		t.Fatal("f1 done with w2 pending")
	}
	b.end(w2)
	if !isDone(f1) || !isDone(f2) {
		t.Fatal("flushes not released once their writes completed")
	}
	f3 := b.seal()
	if isDone(f3) {
		t.Fatal("f3 ignores w4")
	}
	b.end(w4)
	if !isDone(f3) || !isDone(b.seal()) {
		t.Fatal("f3 not released")
	}
}

func TestBufPool(t *testing.T) {
	for _, n := range []int{1, 4096, 4097, 1 << 20, 32 << 20, 64<<20 + 1} {
		p := getBuf(n)
		if len(*p) != n {
			t.Fatalf("getBuf(%d) has length %d", n, len(*p))
		}
		if n <= 64<<20 && cap(*p)&(cap(*p)-1) != 0 {
			t.Fatalf("getBuf(%d) capacity %d is not a size class", n, cap(*p))
		}
		putBuf(p)
	}
	if raceEnabled {
		return
	}
	allocs := testing.AllocsPerRun(100, func() {
		putBuf(getBuf(64 << 10))
	})
	if allocs > 0 {
		t.Fatalf("pooled buffers allocate %.1f times per use", allocs)
	}
}

func TestBlockSizes(t *testing.T) {
	for _, tc := range []struct {
		e                 Export
		maxPayload        uint32
		minB, prefB, maxB uint32
		err               string
	}{
		{Export{}, 32 << 20, 1, 4096, 32 << 20, ""},
		{Export{MinBlock: 512, PrefBlock: 65536, MaxBlock: 1 << 20}, 32 << 20, 512, 65536, 1 << 20, ""},
		{Export{MinBlock: 8192}, 32 << 20, 8192, 8192, 32 << 20, ""},
		{Export{}, 2048, 1, 2048, 2048, ""},
		{Export{MinBlock: 3}, 32 << 20, 0, 0, 0, "minimum block size 3"},
		{Export{MinBlock: 128 << 10}, 32 << 20, 0, 0, 0, "minimum block size"},
		{Export{PrefBlock: 1000}, 32 << 20, 0, 0, 0, "preferred block size 1000"},
		{Export{MinBlock: 4096, MaxBlock: 6000}, 32 << 20, 0, 0, 0, "maximum block size 6000"},
	} {
		minB, prefB, maxB, err := tc.e.blockSizes(tc.maxPayload)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%+v: error %v, want %q", tc.e, err, tc.err)
			}
			continue
		}
		if err != nil || minB != tc.minB || prefB != tc.prefB || maxB != tc.maxB {
			t.Errorf("%+v: got %d/%d/%d %v, want %d/%d/%d", tc.e, minB, prefB, maxB, err, tc.minB, tc.prefB, tc.maxB)
		}
	}
}

func TestStaticExports(t *testing.T) {
	var s StaticExports
	if _, err := s.Lookup("x"); !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("empty: %v", err)
	}
	e := &Export{Backend: NewMemBackend(4096)}
	s.Add("a/b", e)
	s.Refuse("a/c", errors.New("backup"))
	if got, err := s.Lookup("a/b"); got != e || err != nil {
		t.Fatalf("Lookup a/b: %v %v", got, err)
	}
	if _, err := s.Lookup("a/c"); err == nil || err.Error() != "backup" {
		t.Fatalf("Lookup a/c: %v", err)
	}
	if _, err := s.Lookup(""); !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("Lookup default: %v", err)
	}
	s.SetDefault("a/b")
	if got, _ := s.Lookup(""); got != e {
		t.Fatal("default not served")
	}
	if got := strings.Join(s.List(), ","); got != "a/b" {
		t.Fatalf("List %q", got)
	}
	s.Add("a/c", e)
	s.Remove("a/b")
	if got := strings.Join(s.List(), ","); got != "a/c" {
		t.Fatalf("List %q", got)
	}
}

func TestMemBackend(t *testing.T) {
	ctx := context.Background()
	m := NewMemBackend(10000) // not a page multiple
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(m.WriteAt(ctx, pattern(100, 1), 9900, false))
	must(m.WriteAt(ctx, pattern(100, 2), 0, true))
	assertBytes(t, "fua durable", m.Durable()[:100], pattern(100, 2))
	m.Crash()
	assertBytes(t, "lost after crash", m.Bytes()[9900:], make([]byte, 100))
	must(m.WriteAt(ctx, pattern(100, 3), 9900, false))
	must(m.Flush(ctx))
	m.Crash()
	assertBytes(t, "flushed survives crash", m.Bytes()[9900:], pattern(100, 3))
	must(m.WriteZeroes(ctx, 9950, 50, false))
	p := make([]byte, 100)
	must(m.ReadAt(ctx, p, 9900))
	assertBytes(t, "zeroed", p[50:], make([]byte, 50))
	if err := m.ReadAt(ctx, p, 9950); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read past end: %v", err)
	}
	boom := errors.New("boom")
	m.SetHook(func(ctx context.Context, op Op, off, n int64) error {
		if op == OpTrim {
			return boom
		}
		return nil
	})
	if err := m.Trim(ctx, 0, 10, false); !errors.Is(err, boom) {
		t.Fatalf("hooked trim: %v", err)
	}
	if m.Calls(OpTrim) != 1 || m.Calls(OpWrite) != 3 {
		t.Fatalf("calls trim %d write %d", m.Calls(OpTrim), m.Calls(OpWrite))
	}
}

func TestDecodeRequest(t *testing.T) {
	b := encodeRequest(CmdWrite, CmdFlagFUA, 0x0102030405060708, 1<<40, 65536)
	h, err := decodeRequest(b)
	if err != nil || h != (requestHeader{Flags: CmdFlagFUA, Type: CmdWrite, Handle: 0x0102030405060708, Offset: 1 << 40, Length: 65536}) {
		t.Fatalf("%+v %v", h, err)
	}
	if _, err := decodeRequest(b[:27]); !errors.Is(err, ErrProtocol) {
		t.Fatalf("short: %v", err)
	}
	b[3] = 0
	if _, err := decodeRequest(b); !errors.Is(err, ErrProtocol) {
		t.Fatalf("bad magic: %v", err)
	}
}

func TestCleanString(t *testing.T) {
	if got := cleanString("a\x00b\xffc"); got != "ab\uFFFDc" {
		t.Fatalf("%q", got)
	}
	long := strings.Repeat("é", 3000) // 6000 bytes
	got := cleanString(long)
	if len(got) > maxStringLen || !strings.HasPrefix(long, got) || len(got) < maxStringLen-1 {
		t.Fatalf("truncated to %d bytes", len(got))
	}
}
