package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

const (
	token = "bench-token"
	ns    = "bench"
)

// freePort returns a loopback address with a port nobody listens on now.
func freePort() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// agentProc is one agent process (one simulated node) on loopback.
type agentProc struct {
	b                      *bench
	bin                    string // agent binary
	node, dir              string
	ctrl, repl, nbd, pprof string
	cmd                    *exec.Cmd
	exited                 chan struct{}
	api                    *agentapi.Client // its control API (the harness links neither the agent nor a Kubernetes client)
}

// newAgent allocates ports and a data dir; start runs it.
func (b *bench) newAgent(node string) *agentProc {
	a := &agentProc{b: b, bin: b.agentBin, node: node, dir: filepath.Join(b.work, node),
		ctrl: freePort(), repl: freePort(), nbd: freePort(), pprof: freePort()}
	a.api = &agentapi.Client{BaseURL: "http://" + a.ctrl, Token: token, HTTP: &http.Client{Timeout: callTimeout}}
	return a
}

func (a *agentProc) start() error {
	if err := os.MkdirAll(a.dir, 0o700); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(a.b.work, a.node+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	a.cmd = exec.Command(a.bin, "--node", a.node, "--data-dir", a.dir,
		"--control-address", a.ctrl, "--replication-address", a.repl, "--nbd-address", a.nbd,
		"--pprof-address", a.pprof, "--token-file", a.b.tokenFile)
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start agent %s: %w", a.node, err)
	}
	a.exited = make(chan struct{})
	go func() { _ = a.cmd.Wait(); logf.Close(); close(a.exited) }()
	a.b.procs = append(a.b.procs, a)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + a.ctrl + "/healthz")
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

// waitFor polls cond every 10 ms until it holds or timeout passes.
func waitFor(timeout time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		if err != nil {
			last = err
		}
		if time.Now().After(deadline) {
			if last != nil {
				return fmt.Errorf("timed out after %v waiting for %s (last error: %v)", timeout, what, last)
			}
			return fmt.Errorf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pair configures vol as a pair: p primary, s backup, mode, at epoch.
func pair(p, s *agentProc, vol string, size int64, mode agentapi.Mode, epoch uint64) error {
	if err := s.put(vol, size, agentapi.Spec{Role: agentapi.RoleBackup, Epoch: epoch, Mode: mode, PeerNode: p.node}); err != nil {
		return err
	}
	return p.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: epoch, Mode: mode, PeerNode: s.node, PeerAddress: s.repl})
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
	addr := freePort()
	host, port, _ := net.SplitHostPort(addr)
	logf, err := os.OpenFile(filepath.Join(b.work, "nbdkit-"+port+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	n := &nbdkitProc{addr: addr, exited: make(chan struct{})}
	n.cmd = exec.Command("nbdkit", "--foreground", "-i", host, "-p", port, "file", file)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() { _ = n.cmd.Wait(); logf.Close(); close(n.exited) }()
	b.nbdkits = append(b.nbdkits, n)
	err = waitFor(10*time.Second, "nbdkit listening", func() (bool, error) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false, err
		}
		c.Close()
		return true, nil
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
