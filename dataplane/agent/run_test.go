package agent_test

import (
	"context"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	clocktesting "k8s.io/utils/clock/testing"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/authority"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// runningAgent is an in-process agent started with agent.Run on loopback
// listeners (testkit.Listen).
type runningAgent struct {
	*agent.Agent
	ep  agent.Endpoints
	c   *agent.Client // its control API, with the agent's token
	log *logBuf       // its log, when the options gave none
	// stop cancels Run and returns what it returned (once; later calls
	// return the same).
	stop func() error
}

// startAgent runs agent.Run(o) in the background; the listeners, node name
// ("node-a") and data dir (a temporary one) are filled in when o leaves
// them empty. When the test ends the agent is stopped, Run must have
// returned nil and closed every replica without an error, and a failed
// test prints the agent's log.
func startAgent(t *testing.T, o agent.Options) *runningAgent {
	t.Helper()
	r := &runningAgent{}
	if o.Control == nil {
		o.Control = testkit.Listen(t)
	}
	if o.Replication == nil {
		o.Replication = testkit.Listen(t)
	}
	if o.NBD == nil {
		o.NBD = testkit.Listen(t)
	}
	if o.Node == "" {
		o.Node = "node-a"
	}
	if o.DataDir == "" {
		o.DataDir = t.TempDir()
	}
	if o.Log.GetSink() == nil {
		r.log = &logBuf{}
		o.Log = funcr.New(func(prefix, args string) { r.log.add(prefix + " " + args) }, funcr.Options{})
	}
	up := make(chan struct{})
	o.Started = func(a *agent.Agent, ep agent.Endpoints) { r.Agent, r.ep = a, ep; close(up) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Run(ctx, o) }()
	select {
	case <-up:
	case err := <-done:
		cancel()
		t.Fatalf("agent.Run returned before serving: %v", err)
	}
	r.c = agent.NewClient(r.ep.Control, o.Token)
	var once sync.Once
	var runErr error
	r.stop = func() error {
		once.Do(func() {
			cancel()
			runErr = <-done
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := r.stop(); err != nil {
			t.Errorf("agent.Run: %v", err)
		}
		if r.log == nil {
			return
		}
		lg := r.log.String()
		if strings.Contains(lg, `"Closing replicas"`) {
			t.Error("the agent failed to close its replicas (see its log)")
		}
		if t.Failed() {
			t.Logf("---- %s agent log (tail) ----\n%s", o.Node, tail(lg, 80))
		}
	})
	return r
}

// TestRunServesAndShutsDown: an agent assembled by Run answers its control
// API, reports the endpoints it advertises, serves NBD and replication,
// and on cancellation closes its replicas and every listener and returns
// nil.
func TestRunServesAndShutsDown(t *testing.T) {
	dir := t.TempDir()
	r := startAgent(t, agent.Options{Config: agent.Config{DataDir: dir, Token: "tok"}})
	a, ep, stop, c := r.Agent, r.ep, r.stop, r.c
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.ControlAddress != ep.Control || info.ReplicationAddress != ep.Replication || info.NBDAddress != ep.NBD {
		t.Errorf("info %+v, advertised %+v", info, ep)
	}
	if ep.DataDir != dir {
		t.Errorf("advertised data dir %q, want %q", ep.DataDir, dir)
	}
	if _, err := c.Put(context.Background(), "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10,
		Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Initialize: true, Mode: agentapi.ModeAsync}}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Lookup("ns/vol"); err != nil {
		t.Fatalf("the NBD export of a standalone primary: %v", err)
	}
	for _, addr := range []string{ep.NBD, ep.Replication} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		c.Close()
	}

	if err := stop(); err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
	for _, addr := range []string{strings.TrimPrefix(ep.Control, "http://"), ep.NBD, ep.Replication} {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after Run returned", addr)
		}
	}
	// The replica was closed cleanly: a new agent opens it, fenced.
	b, err := agent.New(agent.Config{Node: "node-a", DataDir: dir, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := b.Lookup("ns/vol"); err == nil {
		t.Fatal("a reopened replica is served before the controller gave it a role")
	}
}

// TestRunAdvertiseHost: the advertised endpoints carry AdvertiseHost with
// the listeners' ports.
func TestRunAdvertiseHost(t *testing.T) {
	ep := startAgent(t, agent.Options{Config: agent.Config{AdvertiseHost: "198.18.0.7"}}).ep
	for _, addr := range []string{strings.TrimPrefix(ep.Control, "http://"), ep.Replication, ep.NBD} {
		if host, _, err := net.SplitHostPort(addr); err != nil || host != "198.18.0.7" {
			t.Errorf("advertised %q, want host 198.18.0.7", addr)
		}
	}
}

// TestRunRegistersAndRenews: with a Kubernetes client, Run registers the
// agent Lease (with the advertised endpoints, renewTime from the agent's
// clock) and gates writes by the authority Leases.
func TestRunRegistersAndRenews(t *testing.T) {
	cs := fake.NewClientset()
	t0 := time.Date(2031, 6, 1, 0, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(t0)
	r := startAgent(t, agent.Options{Config: agent.Config{Token: "tok", Clock: clk},
		Leases: cs.CoordinationV1(), Namespace: "tandem-system"})
	a, ep, stop := r.Agent, r.ep, r.stop
	leases := cs.CoordinationV1().Leases("tandem-system")
	testkit.Eventually(t, 10*time.Second, "the agent Lease", func() (bool, error) {
		l, err := leases.Get(context.Background(), v1.AgentLeaseName("node-a"), metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if l.Annotations[v1.AnnControlEndpoint] != ep.Control || l.Annotations[v1.AnnNBDEndpoint] != ep.NBD ||
			l.Annotations[v1.AnnReplicationEndpoint] != ep.Replication || l.Annotations[v1.AnnDataDir] != ep.DataDir {
			t.Fatalf("agent Lease annotations %v, endpoints %+v", l.Annotations, ep)
		}
		// The CSI controller places volumes by the data directory's free space.
		free, err1 := strconv.ParseInt(l.Annotations[v1.AnnFreeBytes], 10, 64)
		total, err2 := strconv.ParseInt(l.Annotations[v1.AnnCapacityBytes], 10, 64)
		if err1 != nil || err2 != nil || free <= 0 || total < free {
			t.Fatalf("agent Lease free/capacity bytes %q/%q", l.Annotations[v1.AnnFreeBytes], l.Annotations[v1.AnnCapacityBytes])
		}
		if !l.Spec.RenewTime.Time.Equal(t0) {
			t.Fatalf("agent Lease renewTime %v, want the agent clock's %v", l.Spec.RenewTime, t0)
		}
		return true, nil
	})
	// The KubeAuthority gates the writes: a primary is not served until
	// its authority Lease names this node at its epoch and was renewed.
	if _, err := r.c.Put(context.Background(), "ns", "vol", agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10,
		Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Initialize: true, Mode: agentapi.ModeAsync, PairUID: "uid-1"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Lookup("ns/vol"); err == nil {
		t.Fatal("a primary without an authority Lease is served")
	}
	l, err := authority.NewLease("tandem-system", authority.Pair{Namespace: "ns", Name: "vol", UID: "uid-1"}, "node-a", 1, 6*time.Second, t0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leases.Create(context.Background(), l, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "the primary served once its authority Lease is renewed", func() (bool, error) {
		_, err := a.Lookup("ns/vol")
		return err == nil, err
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestRunRefusesBadOptions: Run without its listeners, or with both a
// Kubernetes client and an Authority, fails at once and closes the
// listeners it was given.
func TestRunRefusesBadOptions(t *testing.T) {
	cs := fake.NewClientset()
	for name, o := range map[string]agent.Options{
		"no NBD listener":      {Config: agent.Config{Node: "n", DataDir: t.TempDir()}, Control: testkit.Listen(t), Replication: testkit.Listen(t)},
		"leases and authority": {Config: agent.Config{Node: "n", DataDir: t.TempDir(), Authority: volume.AlwaysAuthorized{}}, Control: testkit.Listen(t), Replication: testkit.Listen(t), NBD: testkit.Listen(t), Leases: cs.CoordinationV1(), Namespace: "x"},
		"leases, no namespace": {Config: agent.Config{Node: "n", DataDir: t.TempDir()}, Control: testkit.Listen(t), Replication: testkit.Listen(t), NBD: testkit.Listen(t), Leases: cs.CoordinationV1()},
		"no node name":         {Config: agent.Config{DataDir: t.TempDir()}, Control: testkit.Listen(t), Replication: testkit.Listen(t), NBD: testkit.Listen(t)},
	} {
		t.Run(name, func(t *testing.T) {
			o.Started = func(*agent.Agent, agent.Endpoints) { t.Error("started") }
			if err := agent.Run(context.Background(), o); err == nil {
				t.Fatal("Run accepted the options")
			}
			for _, l := range []net.Listener{o.Control, o.Replication, o.NBD} {
				if l == nil {
					continue
				}
				if c, err := net.Dial("tcp", l.Addr().String()); err == nil {
					c.Close()
					t.Errorf("listener %s left open", l.Addr())
				}
			}
		})
	}
}

// TestRunEndsWhenAListenerFails: a listener that fails for good ends Run
// with its error, after the same ordered shutdown.
func TestRunEndsWhenAListenerFails(t *testing.T) {
	ctl := testkit.Listen(t)
	o := agent.Options{Config: agent.Config{Node: "n", DataDir: t.TempDir(), Log: logr.Discard()},
		Control: ctl, Replication: testkit.Listen(t), NBD: testkit.Listen(t),
		Started: func(*agent.Agent, agent.Endpoints) { ctl.Close() }}
	done := make(chan error, 1)
	go func() { done <- agent.Run(context.Background(), o) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Run returned nil after its control listener failed")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after its control listener failed")
	}
}
