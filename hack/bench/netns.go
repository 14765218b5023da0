package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// -netns: the fio section in the topology of a Tandem pair on the local
// cluster. The primary side runs in one network namespace, the backup
// side in another, each with a veth into a bridge in the harness's
// namespace; fio stays in the harness's namespace and reaches the primary
// side over the bridge. Only addresses in 198.18.0.128/25 are used: the
// upper half of the benchmarking range of RFC 2544 (198.18.0.0/24), whose
// lower half the local cluster's nodes use (hack/local-cluster.sh), so both
// can be up at once. Traffic between the two namespaces is bridged, not
// routed: no sysctl is touched.
const (
	networkLoopback = ""
	networkNetns    = "two network namespaces over a bridge"

	netnsBridge     = "tbench0"
	netnsBridgeAddr = "198.18.0.129/25"
	netnsSubnet     = "198.18.0.128/25"
	netnsPrimary    = "tbench-a"
	netnsBackup     = "tbench-b"
	netnsAddrA      = "198.18.0.130"
	netnsAddrB      = "198.18.0.131"
)

// netnsSide is one namespace: its name, the host side of its veth (in the
// bridge), the address of its end (eth0 inside).
type netnsSide struct{ name, veth, addr string }

// netnsSides are the primary's namespace and the backup's.
var netnsSides = []netnsSide{
	{netnsPrimary, netnsPrimary + "-br", netnsAddrA},
	{netnsBackup, netnsBackup + "-br", netnsAddrB},
}

// place is where a process of the fio section runs: the CPUs (taskset -c;
// empty: any) and the network namespace (empty: the harness's own, on
// loopback) with the address it listens on and advertises.
type place struct {
	cpu   string
	netns string // a name under /run/netns (ip netns)
	host  string // empty: 127.0.0.1
}

func (p place) listenHost() string {
	if p.host == "" {
		return "127.0.0.1"
	}
	return p.host
}

// wrap is the command line that runs name with args in p: nsenter enters
// the network namespace and execs (no --fork: it forks only to enter a PID
// namespace), taskset sets the CPUs and execs, so the process keeps the
// pid the harness started (its CPU time is the command's own) and every
// thread it starts inherits both.
func (p place) wrap(name string, args ...string) []string {
	var cmd []string
	if p.netns != "" {
		cmd = append(cmd, "nsenter", "--net="+netnsPath(p.netns), "--")
	}
	if p.cpu != "" {
		cmd = append(cmd, "taskset", "-c", p.cpu)
	}
	return append(append(cmd, name), args...)
}

// command is exec.Command of name with args run in p.
func (p place) command(name string, args ...string) *exec.Cmd {
	c := p.wrap(name, args...)
	return exec.Command(c[0], c[1:]...)
}

// listen opens a TCP listener on p's host, port 0, in p's network
// namespace (a socket belongs to the namespace it was created in; the
// process it is handed to may run anywhere).
func (p place) listen() (net.Listener, error) {
	var l net.Listener
	err := inNetns(p.netns, func() error {
		var err error
		l, err = net.Listen("tcp", net.JoinHostPort(p.listenHost(), "0"))
		return err
	})
	return l, err
}

// freePort is an address on p's host (in p's namespace) with a port
// nobody listens on now; another process may take it before the caller
// binds it. Only for agent binaries without --addresses-file (a -compare
// baseline older than it).
func (p place) freePort() (string, error) {
	l, err := p.listen()
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func netnsPath(name string) string { return "/run/netns/" + name }

// inNetns runs fn in the network namespace netns (the harness's own if
// empty), on a goroutine locked to its OS thread while the thread is in
// that namespace; sockets fn creates stay in the namespace. Afterwards the
// thread enters its own namespace again and only then is unlocked: a
// thread that exits kills the children it forked earlier for some other
// goroutine (their Pdeathsig is bound to the forking thread, not to the
// process), which is what letting the thread exit with the goroutine did
// to nbdkit and qemu-storage-daemon now and then. Only if it cannot go back
// does it stay locked and exit with the goroutine, never running other
// goroutines in the wrong namespace.
func inNetns(netns string, fn func() error) error {
	if netns == "" {
		return fn()
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer orig.Close()
		f, err := os.Open(netnsPath(netns))
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			runtime.UnlockOSThread() // still in its own namespace
			done <- fmt.Errorf("setns %s: %w", netns, err)
			return
		}
		err = fn()
		if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr != nil {
			// Locked for good: the thread exits with the goroutine.
			fmt.Fprintf(os.Stderr, "bench: a thread left in network namespace %s (%v) exits; processes it started may be killed\n", netns, rerr)
			done <- err
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}

// sides are where the primary side and the backup side of the fio section
// run: the CPUs with -pin, the namespaces with -netns.
func (b *bench) sides() (primary, backup place) {
	if b.pin {
		primary.cpu, backup.cpu = cpuPrimary, cpuBackup
	}
	if b.netns {
		primary.netns, primary.host = netnsPrimary, netnsAddrA
		backup.netns, backup.host = netnsBackup, netnsAddrB
	}
	return primary, backup
}

// netnsUp creates the bridge and the two namespaces (root only). It holds
// b.mu meanwhile, so that a signal's cleanup waits for it and then removes
// everything it created; cleanup removes them after the section
// (netnsDown).
func (b *bench) netnsUp() error {
	if os.Geteuid() != 0 {
		return errors.New("-netns creates network namespaces and a bridge: run it as root (sudo)")
	}
	for _, c := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(c); err != nil {
			return fmt.Errorf("-netns needs %s: %w", c, err)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := netnsFree(); err != nil {
		return err
	}
	b.netnsCreated = true // from here on, cleanup removes whatever exists
	steps := [][]string{
		{"link", "add", netnsBridge, "type", "bridge"},
		{"addr", "add", netnsBridgeAddr, "dev", netnsBridge},
		{"link", "set", netnsBridge, "up"},
	}
	for _, s := range netnsSides {
		peer := s.name + "-ns"
		steps = append(steps,
			[]string{"netns", "add", s.name},
			[]string{"-n", s.name, "link", "set", "lo", "up"},
			[]string{"link", "add", s.veth, "type", "veth", "peer", "name", peer},
			[]string{"link", "set", peer, "netns", s.name},
			[]string{"-n", s.name, "link", "set", peer, "name", "eth0"},
			[]string{"-n", s.name, "addr", "add", s.addr + "/25", "dev", "eth0"},
			[]string{"-n", s.name, "link", "set", "eth0", "up"},
			[]string{"link", "set", s.veth, "master", netnsBridge},
			[]string{"link", "set", s.veth, "up"},
		)
	}
	for _, s := range steps {
		if err := ipCmd(s...); err != nil {
			return fmt.Errorf("-netns: %w", err)
		}
	}
	// Each namespace reaches the other and the harness's namespace over
	// the bridge (the ports forward at once: no STP).
	for _, from := range netnsSides {
		for _, to := range netnsSides {
			if from.name == to.name {
				continue
			}
			if err := netnsReach(from.name, to); err != nil {
				return err
			}
		}
		if err := netnsReach("", from); err != nil {
			return err
		}
	}
	b.logln("network namespaces %s (%s) and %s (%s) over the bridge %s (%s)", netnsPrimary, netnsAddrA, netnsBackup, netnsAddrB, netnsBridge, netnsBridgeAddr)
	return nil
}

// netnsReach waits until a connection from namespace from (the harness's
// if empty) reaches a listener in namespace to.
func netnsReach(from string, to netnsSide) error {
	l, err := place{netns: to.name, host: to.addr}.listen()
	if err != nil {
		return fmt.Errorf("-netns: listen in %s: %w", to.name, err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var last error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		last = inNetns(from, func() error {
			c, err := net.DialTimeout("tcp", l.Addr().String(), time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if last == nil {
			return nil
		}
	}
	if from == "" {
		from = "the harness's namespace"
	}
	return fmt.Errorf("-netns: %s does not reach %s in %s: %w", from, l.Addr(), to.name, last)
}

// netnsFree reports an error if a namespace, a link or an address the
// -netns topology needs is there already (another run, or one that was
// killed: remove them as the error says).
func netnsFree() error {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return fmt.Errorf("ip netns list: %w", err)
	}
	var found []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && slices.ContainsFunc(netnsSides, func(s netnsSide) bool { return s.name == f[0] }) {
			found = append(found, "namespace "+f[0])
		}
	}
	for _, l := range append([]string{netnsBridge}, netnsSides[0].veth, netnsSides[1].veth) {
		if exec.Command("ip", "link", "show", "dev", l).Run() == nil {
			found = append(found, "link "+l)
		}
	}
	if out, _ := exec.Command("ip", "-4", "-o", "addr", "show", "to", netnsSubnet).Output(); len(strings.TrimSpace(string(out))) > 0 {
		found = append(found, "addresses in "+netnsSubnet+": "+strings.TrimSpace(string(out)))
	}
	if len(found) > 0 {
		return fmt.Errorf("-netns: already there: %s (left by another run? remove with: ip netns del %s; ip netns del %s; ip link del %s)",
			strings.Join(found, "; "), netnsPrimary, netnsBackup, netnsBridge)
	}
	return nil
}

// netnsDown removes the veths, the bridge and the namespaces, whichever
// exist; the processes in the namespaces must be gone (a namespace lives
// on while a process is in it). Called with b.mu held.
func (b *bench) netnsDown() {
	if !b.netnsCreated {
		return
	}
	b.netnsCreated = false
	var errs []error
	for _, s := range netnsSides {
		// Deleting one end of a veth deletes the other (in the namespace).
		if exec.Command("ip", "link", "show", "dev", s.veth).Run() == nil {
			errs = append(errs, ipCmd("link", "del", s.veth))
		}
	}
	if exec.Command("ip", "link", "show", "dev", netnsBridge).Run() == nil {
		errs = append(errs, ipCmd("link", "del", netnsBridge))
	}
	for _, s := range netnsSides {
		if _, err := os.Stat(netnsPath(s.name)); err == nil {
			errs = append(errs, ipCmd("netns", "del", s.name))
		}
	}
	if err := errors.Join(errs...); err != nil {
		b.logln("-netns cleanup: %v", err)
		return
	}
	b.logln("network namespaces and bridge removed")
}

func ipCmd(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
