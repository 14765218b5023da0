// Package testkit holds what Tandem's tests share: one way to wait for a
// condition (Eventually, and Wait for code that has no testing.T), file
// hashing, loopback listeners handed to servers, and the -short switch.
//
// # Listeners, not free ports
//
// A test never asks for a "free port" by listening on port 0, closing the
// listener and passing the address on: between the close and the server's
// own listen, any process on the machine may take the port. A test instead
// creates the listener once (Listen) and gives it to the server (in-process
// agents: agent.Run takes net.Listeners), or starts a server process with
// port 0 and reads back the address it bound (the agent's --addresses-file).
// The one exception is restarting a server on the address it had: peers
// and Leases name that address, so it is bound again by number, as a
// restarted node would. Such a server's first listener comes from
// ListenRestartable: a port below the kernel's ephemeral range, which the
// kernel never gives to a connection or a port-0 listener of another test
// meanwhile (a port from Listen could be, and the restart then found it
// taken). A test that needs an address where nothing listens uses
// RefusingAddr, which holds the port without listening.
//
// # Slow suites
//
// SkipIfShort marks the suites go test -short skips (agent processes,
// envtest stories with agents); make test and .ci/run run them all.
//
// It is imported by tests (and by test harnesses such as hack/bench) only.
package testkit

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// DefaultInterval is how often Eventually and Wait evaluate a condition,
// unless given Every.
const DefaultInterval = 10 * time.Millisecond

// Condition is what Eventually and Wait poll: a plain predicate, or one
// that also says what it saw (a string, or an error), which is reported if
// the wait times out. An error does not end the wait: it is the last
// observation, like a string.
type Condition interface {
	func() bool | func() (bool, string) | func() (bool, error)
}

// Option tunes a wait.
type Option func(*waitOpts)

type waitOpts struct{ interval time.Duration }

// Every sets the polling interval (default DefaultInterval): longer for
// conditions that cost a process or a round trip to evaluate.
func Every(d time.Duration) Option { return func(o *waitOpts) { o.interval = d } }

// Wait evaluates cond every interval until it holds, and returns nil then;
// once timeout has passed (cond is evaluated one last time after it) it
// returns an error naming what and the last thing cond reported.
func Wait[C Condition](timeout time.Duration, what string, cond C, opts ...Option) error {
	o := waitOpts{interval: DefaultInterval}
	for _, f := range opts {
		f(&o)
	}
	eval := evaluator(cond)
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, seen := eval()
		if ok {
			return nil
		}
		if seen != "" {
			last = seen
		}
		if time.Now().After(deadline) {
			if last != "" {
				return fmt.Errorf("timed out after %v waiting for %s (last: %s)", timeout, what, last)
			}
			return fmt.Errorf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(o.interval)
	}
}

// Eventually is Wait that fails t (t.Fatal) when the wait times out.
func Eventually[C Condition](t testing.TB, timeout time.Duration, what string, cond C, opts ...Option) {
	t.Helper()
	if err := Wait(timeout, what, cond, opts...); err != nil {
		t.Fatal(err)
	}
}

func evaluator[C Condition](cond C) func() (bool, string) {
	switch c := any(cond).(type) {
	case func() bool:
		return func() (bool, string) { return c(), "" }
	case func() (bool, string):
		return c
	case func() (bool, error):
		return func() (bool, string) {
			ok, err := c()
			if err != nil {
				return ok, err.Error()
			}
			return ok, ""
		}
	}
	panic("unreachable: Condition has three shapes")
}

// HashFile returns the hex SHA-256 of the file at path.
func HashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// FileSHA256 is HashFile that fails t when the file cannot be read.
func FileSHA256(t testing.TB, path string) string {
	t.Helper()
	s, err := HashFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// SHA256 is the hex SHA-256 of b, to compare with FileSHA256.
func SHA256(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// SkipIfShort skips t under go test -short, saying why the test is slow:
// the suites that start processes, run many trials or tell long stories
// against envtest. make test and .ci/run do not pass -short: they run
// everything.
func SkipIfShort(t testing.TB, why string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("skipped with -short: %s", why)
	}
}

// Listen returns a listener on a port of 127.0.0.1 chosen by the kernel,
// closed when the test ends (closing it twice is harmless). Hand it to the
// server; read the address from it.
func Listen(t testing.TB) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen on loopback: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// ListenRestartable returns a listener on 127.0.0.1 for a server the test
// will stop and start again on the same address (see the package doc):
// its port is below the kernel's ephemeral range
// (net.ipv4.ip_local_port_range), picked at random and tried until one is
// free. Closed when the test ends.
func ListenRestartable(t testing.TB) net.Listener {
	t.Helper()
	lo, hi := restartablePorts()
	var err error
	for range 200 {
		var l net.Listener
		port := lo + rand.IntN(hi-lo)
		if l, err = net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err == nil {
			t.Cleanup(func() { l.Close() })
			return l
		}
	}
	t.Fatalf("no free loopback port in %d-%d: %v", lo, hi-1, err)
	return nil
}

// restartablePorts is the range ListenRestartable picks from: [lo, hi),
// the 10000 ports below the ephemeral range's start (or, if that range
// starts too low, those above its end).
func restartablePorts() (lo, hi int) {
	first, last := 32768, 60999 // Linux's default
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			a, errA := strconv.Atoi(f[0])
			z, errZ := strconv.Atoi(f[1])
			if errA == nil && errZ == nil && a <= z {
				first, last = a, z
			}
		}
	}
	const want = 10000
	switch {
	case first-want >= 1024:
		return first - want, first
	case 65535-last >= want:
		return last + 1, last + 1 + want
	default: // no room outside it: any unprivileged port
		return 1024, 65536
	}
}

// RefusingAddr returns a loopback address whose connections are refused:
// its port is held by a socket that is bound but does not listen, until
// the test ends. Closing a listener to get such an address would let any
// process take the port meanwhile.
func RefusingAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socket: %v", err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatalf("bind on loopback: %v", err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatalf("getsockname: %v", err)
	}
	in4, ok := sa.(*syscall.SockaddrInet4)
	if !ok {
		t.Fatalf("getsockname: %T", sa)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(in4.Port))
}
