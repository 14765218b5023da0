package testkit

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestWaitHolds(t *testing.T) {
	n := 0
	if err := Wait(time.Second, "third call", func() bool { n++; return n == 3 }); err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Fatalf("cond called %d times, want 3", n)
	}
}

func TestWaitTimesOutWithLastObservation(t *testing.T) {
	for name, tc := range map[string]struct {
		err  error
		want string
	}{
		"bool": {
			err:  Wait(30*time.Millisecond, "never", func() bool { return false }),
			want: "timed out after 30ms waiting for never",
		},
		"string": {
			err:  Wait(30*time.Millisecond, "never", func() (bool, string) { return false, "saw 7" }),
			want: "waiting for never (last: saw 7)",
		},
		"error": {
			err:  Wait(30*time.Millisecond, "never", func() (bool, error) { return false, errors.New("refused") }),
			want: "waiting for never (last: refused)",
		},
	} {
		t.Run(name, func(t *testing.T) {
			if tc.err == nil || !strings.Contains(tc.err.Error(), tc.want) {
				t.Fatalf("err %v, want one containing %q", tc.err, tc.want)
			}
		})
	}
}

// The condition is evaluated once more after the deadline: a wait whose
// last poll lands late still sees a condition that became true meanwhile.
func TestWaitEvaluatesAfterDeadline(t *testing.T) {
	start := time.Now()
	if err := Wait(20*time.Millisecond, "late", func() bool { return time.Since(start) > 25*time.Millisecond }, Every(30*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
}

func TestEveryInterval(t *testing.T) {
	n := 0
	start := time.Now()
	_ = Wait(100*time.Millisecond, "never", func() bool { n++; return false }, Every(40*time.Millisecond))
	if n > 5 || time.Since(start) < 100*time.Millisecond {
		t.Fatalf("%d evaluations in %v with a 40ms interval", n, time.Since(start))
	}
}

func TestHashFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	data := []byte("tandem")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if got, want := FileSHA256(t, p), SHA256(data); got != want {
		t.Fatalf("FileSHA256 %s, SHA256 %s", got, want)
	}
	// sha256("tandem"), computed with sha256sum.
	if got := SHA256(data); got != "7186b6e1e13844499594bc935ee9f1091d59093bcb00eca31c3d563c5bb86f7d" {
		t.Fatalf("SHA256(%q) = %s", data, got)
	}
	if _, err := HashFile(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("hashing a missing file did not fail")
	}
}

func TestListen(t *testing.T) {
	serveOne(t, Listen(t))
}

// serveOne makes one connection to l and accepts it.
func serveOne(t *testing.T, l net.Listener) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		done <- err
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestRefusingAddr(t *testing.T) {
	addr := RefusingAddr(t)
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err == nil {
		c.Close()
		t.Fatalf("a connection to %s was accepted", addr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial %s: %v, want connection refused", addr, err)
	}
	// The port is held: nobody else can listen on it.
	if l, err := net.Listen("tcp", addr); err == nil {
		l.Close()
		t.Fatalf("listening on the refusing address %s succeeded", addr)
	}
}

// TestListenRestartable: the port is outside the kernel's ephemeral range
// (no connection or port-0 listener is given it meanwhile), and a server
// stopped after serving a connection can bind it again.
func TestListenRestartable(t *testing.T) {
	l := ListenRestartable(t)
	addr := l.Addr().String()
	_, p, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(p)
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Fatal(err)
	}
	var first, last int
	if _, err := fmt.Sscan(string(b), &first, &last); err != nil {
		t.Fatal(err)
	}
	if port >= first && port <= last {
		t.Fatalf("port %d is in the ephemeral range %d-%d", port, first, last)
	}
	serveOne(t, l)
	l.Close()
	l2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("binding %s again: %v", addr, err)
	}
	l2.Close()
}
