package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

const (
	token = "bench-token"
	ns    = "bench"
)

// hasAddressesFile reports whether the agent binary bin has the
// --addresses-file flag (agents from before it are started on ports found
// free instead).
func hasAddressesFile(bin string) bool {
	out, _ := exec.Command(bin, "-h").CombinedOutput()
	return strings.Contains(string(out), "-addresses-file")
}

// agentProc is one agent process (one simulated node), on loopback or in
// a network namespace of its own (-netns).
type agentProc struct {
	b                      *bench
	bin                    string // agent binary
	node, dir              string
	at                     place     // its CPUs (-pin) and network namespace (-netns); zero: any CPU, loopback
	tls                    *benchTLS // set: started with --tls-dir (a certificate naming node), its control API called over HTTPS as the manager
	ctrl, repl, nbd, pprof string    // set by the first start
	cmd                    *exec.Cmd
	exited                 chan struct{}
	api                    *agentapi.Client // its control API (the harness links neither the agent nor a Kubernetes client)
}

// volumeDir is where the agent keeps volume name's files (data, journal,
// bitmaps).
func (a *agentProc) volumeDir(name string) string {
	return filepath.Join(a.dir, "volumes", ns, name)
}

// newAgent names an agent and its data dir; start runs it.
func (b *bench) newAgent(node string) *agentProc {
	return &agentProc{b: b, bin: b.agentBin, node: node, dir: filepath.Join(b.work, node)}
}

func (a *agentProc) start() error {
	if err := os.MkdirAll(a.dir, 0o700); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(a.b.work, a.node+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	// The first start binds port 0 and reads back the ports the kernel
	// chose; a restart binds them again (the peer's spec names them).
	addrFile := ""
	ctrl, repl, nbd, pprof := a.ctrl, a.repl, a.nbd, a.pprof
	if ctrl == "" {
		if hasAddressesFile(a.bin) {
			port0 := net.JoinHostPort(a.at.listenHost(), "0")
			ctrl, repl, nbd, pprof = port0, port0, port0, port0
			addrFile = filepath.Join(a.b.work, a.node+".addresses.json")
			_ = os.Remove(addrFile)
		} else {
			var ports [4]string
			for i := range ports {
				var err error
				if ports[i], err = a.at.freePort(); err != nil {
					logf.Close()
					return err
				}
			}
			ctrl, repl, nbd, pprof = ports[0], ports[1], ports[2], ports[3]
			a.ctrl, a.repl, a.nbd, a.pprof = ctrl, repl, nbd, pprof
		}
	}
	args := []string{"--node", a.node, "--data-dir", a.dir,
		"--control-address", ctrl, "--replication-address", repl, "--nbd-address", nbd,
		"--pprof-address", pprof, "--token-file", a.b.tokenFile}
	if a.at.host != "" {
		// What pair() gives the primary as its peer's address: the
		// backup's namespace address, reachable from the other namespace.
		args = append(args, "--advertise-address", a.at.host)
	}
	if addrFile != "" {
		args = append(args, "--addresses-file", addrFile)
	}
	scheme, httpc := "http://", &http.Client{Timeout: callTimeout}
	if a.tls != nil {
		dir, err := a.tls.nodeDir(a.node)
		if err != nil {
			logf.Close()
			return err
		}
		args = append(args, "--tls-dir", dir)
		scheme, httpc.Transport = "https://", agentapi.TLSTransport(a.tls.client)
	}
	a.cmd = a.at.command(a.bin, args...)
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start agent %s: %w", a.node, err)
	}
	a.exited = make(chan struct{})
	go func() { _ = a.cmd.Wait(); logf.Close(); close(a.exited) }()
	a.b.mu.Lock()
	a.b.procs = append(a.b.procs, a)
	a.b.mu.Unlock()
	if addrFile != "" {
		var addrs agentapi.ListenAddresses
		err := testkit.Wait(20*time.Second, "agent "+a.node+" serving", func() (bool, error) {
			if !a.running() {
				return true, nil
			}
			var err error
			addrs, err = agentapi.ReadListenAddresses(addrFile)
			return err == nil, err
		})
		if err != nil {
			return err
		}
		if !a.running() {
			return fmt.Errorf("agent %s exited at start (see %s.log)", a.node, a.node)
		}
		a.ctrl, a.repl, a.nbd, a.pprof = strings.TrimPrefix(addrs.Control, scheme), addrs.Replication, addrs.NBD, addrs.Pprof
	}
	a.api = &agentapi.Client{BaseURL: scheme + a.ctrl, Token: token, HTTP: httpc}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := httpc.Get(scheme + a.ctrl + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-a.exited:
			return fmt.Errorf("agent %s exited at start (see %s.log)", a.node, a.node)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("agent %s did not answer /healthz", a.node)
}

func (a *agentProc) running() bool {
	if a.cmd == nil || a.exited == nil {
		return false
	}
	select {
	case <-a.exited:
		return false
	default:
		return true
	}
}

// kill is a crash: SIGKILL, no clean shutdown.
func (a *agentProc) kill() {
	if a.running() {
		_ = a.cmd.Process.Kill()
		<-a.exited
	}
}

// stop is a clean shutdown.
func (a *agentProc) stop() {
	if a.running() {
		_ = a.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-a.exited:
		case <-time.After(15 * time.Second):
			a.kill()
		}
	}
}

func (a *agentProc) signal(sig syscall.Signal) {
	if a.running() {
		_ = a.cmd.Process.Signal(sig)
	}
}

func (a *agentProc) pid() int { return a.cmd.Process.Pid }

func (a *agentProc) url(vol string) string { return "nbd://" + a.nbd + "/" + ns + "/" + vol }

// callTimeout bounds one control API call.
const callTimeout = 30 * time.Second

func (a *agentProc) put(vol string, size int64, s agentapi.Spec) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if _, err := a.api.Put(ctx, ns, vol, agentapi.VolumeRequest{Size: size, RegionSize: regionSize, Spec: s}); err != nil {
		return fmt.Errorf("%s: PUT %s %+v: %w", a.node, vol, s, err)
	}
	return nil
}

func (a *agentProc) status(vol string) (agentapi.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return a.api.Get(ctx, ns, vol)
}

func (a *agentProc) remove(vol string) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_ = a.api.Delete(ctx, ns, vol, true)
}

// rss is the agent's resident set size in bytes (VmRSS).
func (a *agentProc) rss() (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", a.pid()))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				return kb << 10, err
			}
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}

// pair configures vol as a pair: p primary, s backup, mode, at epoch.
func pair(p, s *agentProc, vol string, size int64, mode agentapi.Mode, epoch uint64) error {
	if err := s.put(vol, size, agentapi.Spec{Role: agentapi.RoleBackup, Epoch: epoch, Mode: mode, PeerNode: p.node}); err != nil {
		return err
	}
	return p.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: epoch, Mode: mode, PeerNode: s.node, PeerAddress: s.repl, Initialize: epoch == 1})
}

// inSync reports whether the writer p streams to its peer with nothing to copy.
func inSync(p, s *agentProc, vol string) func() (bool, error) {
	return func() (bool, error) {
		ps, err := p.status(vol)
		if err != nil {
			return false, err
		}
		ss, err := s.status(vol)
		if err != nil {
			return false, err
		}
		return ps.PeerConnected && ps.OutOfSyncRegions == 0 && !ps.Copy.Running && ss.DataState == agentapi.UpToDate, nil
	}
}

// nbdkitProc is nbdkit's file plugin serving one file: the peer.
type nbdkitProc struct {
	addr   string
	cmd    *exec.Cmd
	exited chan struct{}
}

func (b *bench) startNbdkit(file string, size int64) (*nbdkitProc, error) {
	return b.startNbdkitOn(file, size, place{})
}

// startNbdkitOn is startNbdkit in place at: on its CPUs, in its network
// namespace, listening on its host.
func (b *bench) startNbdkitOn(file string, size int64, at place) (*nbdkitProc, error) {
	if _, err := os.Stat(file); errors.Is(err, os.ErrNotExist) {
		f, err := os.Create(file)
		if err != nil {
			return nil, err
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, err
		}
		f.Close()
	}
	// nbdkit gets its listening socket by socket activation (LISTEN_FDS:
	// fd 3, LISTEN_PID: its own pid, hence the shell's exec), so the port
	// is ours from the start instead of found free and bound later. The
	// socket is opened in the namespace nbdkit runs in.
	l, err := at.listen()
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	lf, err := l.(*net.TCPListener).File() // a duplicate, inherited by nbdkit
	l.Close()
	if err != nil {
		return nil, err
	}
	defer lf.Close() // nbdkit has its own copy once started
	_, port, _ := net.SplitHostPort(addr)
	logf, err := os.OpenFile(filepath.Join(b.work, "nbdkit-"+port+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	n := &nbdkitProc{addr: addr, exited: make(chan struct{})}
	// nsenter and taskset exec nbdkit: LISTEN_PID stays right.
	n.cmd = exec.Command("sh", append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"`, "sh"}, at.wrap("nbdkit", "--foreground", "file", file)...)...)
	n.cmd.ExtraFiles = []*os.File{lf}
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() { _ = n.cmd.Wait(); logf.Close(); close(n.exited) }()
	b.mu.Lock()
	b.nbdkits = append(b.nbdkits, n)
	b.mu.Unlock()
	// The socket accepts connections before nbdkit runs: wait for its
	// greeting, not for a connection.
	err = testkit.Wait(10*time.Second, "nbdkit serving", func() (bool, error) {
		if !processAlive(n.exited) {
			return false, errors.New("nbdkit exited (see its log)")
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false, err
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		magic := make([]byte, 8)
		if _, err := io.ReadFull(c, magic); err != nil {
			return false, err
		}
		return string(magic) == "NBDMAGIC", fmt.Errorf("greeting %q", magic)
	})
	return n, err
}

func (n *nbdkitProc) url() string { return "nbd://" + n.addr + "/" }

func (n *nbdkitProc) stop() {
	select {
	case <-n.exited:
	default:
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-n.exited:
		case <-time.After(5 * time.Second):
			_ = n.cmd.Process.Kill()
			<-n.exited
		}
	}
}
