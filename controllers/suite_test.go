package controllers

// The controller against a real kube-apiserver and etcd (envtest, binaries
// from bin/) with real agents running in-process on loopback: each agent
// registers its Lease, renews authority Leases and serves replication, as the
// agent binary does.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

const (
	opNS  = "tandem-system"
	token = "controller-test-token"
)

var (
	cfg    *rest.Config
	k8s    client.Client
	cs     *kubernetes.Clientset
	scheme = k8sruntime.NewScheme()
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	ctrl.SetLogger(logr.Discard()) // each test gives its manager its own logger
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1.AddToScheme(scheme)
	code := m.Run()
	if env != nil {
		if err := env.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "controllers: stop envtest: %v\n", err)
		}
	}
	return code
}

var (
	envOnce sync.Once
	env     *envtest.Environment // nil until a test needed it
	envErr  error
)

// needEnvtest starts kube-apiserver and etcd (from KUBEBUILDER_ASSETS, or
// bin/) the first time a test needs them, and fails the test if they
// cannot start; under -short it skips the test. Every test that uses cfg, k8s or cs calls it first (the
// helpers newStory, newNode and startManager do), so that the pure tests
// (Decide, status rendering) run with plain go test and without bin/.
func needEnvtest(t testing.TB) {
	t.Helper()
	// Every test here that needs the API server tells a story with
	// in-process agents, and failovers wait for leases.
	testkit.SkipIfShort(t, "an envtest story with in-process agents (tens of seconds)")
	envOnce.Do(func() { envErr = startEnvtest() })
	if envErr != nil {
		t.Fatalf("controllers: %v", envErr)
	}
}

func startEnvtest() error {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Clean(filepath.Join(filepath.Dir(file), ".."))
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		assets = filepath.Join(root, "bin")
	}
	if _, err := os.Stat(filepath.Join(assets, "kube-apiserver")); err != nil {
		return fmt.Errorf("kube-apiserver not in %s; run `make test` or hack/tools.sh: %w", assets, err)
	}
	e := &envtest.Environment{
		CRDDirectoryPaths: []string{filepath.Join(root, "config", "crd", "bases")}, ErrorIfCRDPathMissing: true,
		BinaryAssetsDirectory: assets,
	}
	c, err := e.Start()
	if err != nil {
		_ = e.Stop()
		return fmt.Errorf("envtest: %w", err)
	}
	env, cfg = e, c
	if k8s, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		return err
	}
	if cs, err = kubernetes.NewForConfig(cfg); err != nil {
		return err
	}
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: opNS}}); err != nil {
		return fmt.Errorf("create namespace %s: %w", opNS, err)
	}
	return nil
}

// testLog collects a component's log lines; printed when a test fails.
type testLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *testLog) logger(name string) logr.Logger {
	return funcr.New(func(prefix, args string) {
		l.mu.Lock()
		l.lines = append(l.lines, time.Now().Format("15:04:05.000")+" "+name+" "+prefix+" "+args)
		l.mu.Unlock()
	}, funcr.Options{})
}

func (l *testLog) dump(t testing.TB) {
	l.mu.Lock()
	defer l.mu.Unlock()
	start := max(0, len(l.lines)-150)
	for _, s := range l.lines[start:] {
		t.Log(s)
	}
}

// node is an in-process agent, run by agent.Run as the agent binary runs it.
// Its listeners are created once, in newNode; a restart after kill binds the
// same ports again (its Lease and its peers' specs name them).
type node struct {
	t                   testing.TB
	name, dir           string
	ctrl, repl, nbdAddr string
	log                 *testLog
	netw                nodeNet // what tests can cut
	// clock is the agent's clock (nil: the real one); set before start.
	clock clock.WithTicker

	mu     sync.Mutex
	a      *agent.Agent
	held   []net.Listener // from newNode until the first start
	down   *atomic.Bool   // set by kill: the agent can no longer reach the API server
	ctl    *connTracker   // the control API's connections, closed by kill
	cancel context.CancelFunc
	done   chan error // agent.Run's result
}

func newNode(t testing.TB, name string, log *testLog) *node {
	needEnvtest(t)
	n := &node{t: t, name: name, dir: t.TempDir(), log: log}
	for _, addr := range []*string{&n.ctrl, &n.repl, &n.nbdAddr} {
		// A restart binds these addresses again (the Lease and the peers
		// name them): ports no other test can be given meanwhile.
		l := testkit.ListenRestartable(t)
		n.held = append(n.held, l)
		*addr = l.Addr().String()
	}
	t.Cleanup(func() {
		n.kill()
		for _, l := range n.held { // never started
			l.Close()
		}
	})
	return n
}

// listeners are the node's control, replication and NBD listeners: those
// newNode made, or after a kill new ones on the same addresses (retried
// while the old sockets linger).
func (n *node) listeners() []net.Listener {
	if lns := n.held; lns != nil {
		n.held = nil
		return lns
	}
	var lns []net.Listener
	for _, addr := range []string{n.ctrl, n.repl, n.nbdAddr} {
		var l net.Listener
		var err error
		for i := 0; ; i++ {
			if l, err = net.Listen("tcp", addr); err == nil || i > 50 {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			n.t.Fatal(err)
		}
		lns = append(lns, l)
	}
	return lns
}

func (n *node) start() {
	n.t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	lg := n.log.logger(n.name)
	down := &atomic.Bool{}
	kc := n.netw.clientset(n.t, down)
	lns := n.listeners()
	ctl := &connTracker{Listener: lns[0]}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	started := make(chan *agent.Agent, 1)
	go func() {
		done <- agent.Run(ctx, agent.Options{
			Config: agent.Config{Node: n.name, DataDir: n.dir, Token: token, Dial: n.netw.dial, Clock: n.clock, Log: lg},
			// The replication listener is the one tests can cut.
			Control: ctl, Replication: n.netw.listener(lns[1]), NBD: lns[2],
			Leases: kc.CoordinationV1(), Namespace: opNS,
			// kill is a crash: nothing is handed over.
			HandoverTimeout: -1,
			Started:         func(a *agent.Agent, _ agent.Endpoints) { started <- a },
		})
	}()
	select {
	case a := <-started:
		n.a = a
	case err := <-done:
		cancel()
		n.t.Fatalf("agent %s: %v", n.name, err)
	}
	n.down, n.ctl, n.cancel, n.done = down, ctl, cancel, done
}

// kill stops the agent as a crash would, as far as peers and the API server
// can tell: at once, nothing is renewed any more and the control API is
// gone (its connections closed, new ones refused); then agent.Run shuts
// down the rest (in-process, the replicas must be closed before a restart
// opens them again).
func (n *node) kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.a == nil {
		return
	}
	n.down.Store(true)
	n.ctl.closeAll()
	n.cancel()
	<-n.done // an error here is the control listener closed above
	n.a = nil
}

// connTracker is a listener that remembers its connections, so that
// closeAll can drop them and itself at once.
type connTracker struct {
	net.Listener
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

func (l *connTracker) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	if l.conns == nil {
		l.conns = map[net.Conn]struct{}{}
	}
	l.conns[c] = struct{}{}
	return c, nil
}

func (l *connTracker) closeAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	l.Listener.Close()
	for c := range l.conns {
		c.Close()
	}
	l.conns = nil
}

func (n *node) agent() *agent.Agent {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.a
}

func (n *node) dataPath(ns, name string) string {
	return filepath.Join(n.dir, "volumes", ns, name, "data")
}

// manager runs the controller; stop simulates a crash of the manager.
type manager struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// startLoggedManager starts a manager whose log is dumped if the test
// fails.
func startLoggedManager(t testing.TB) *manager {
	mlog := &testLog{}
	t.Cleanup(func() {
		if t.Failed() {
			mlog.dump(t)
		}
	})
	return startManager(t, mlog, nil)
}

func startManager(t testing.TB, log *testLog, wrap agentapi.NewFunc) *manager {
	t.Helper()
	needEnvtest(t)
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme: scheme, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0",
		Logger:     log.logger("manager"),
		Controller: config.Controller{SkipNameValidation: ptr.To(true)},
		Cache:      CacheOptions(opNS),
	})
	if err != nil {
		t.Fatal(err)
	}
	r := &VolumePairReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Recorder: mgr.GetEventRecorder("tandem-manager"), Namespace: opNS, AgentToken: token, NewAgentClient: wrap}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &manager{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(m.done)
		if err := mgr.Start(ctx); err != nil && !errors.Is(err, context.Canceled) {
			log.logger("manager").Error(err, "Manager stopped")
		}
	}()
	t.Cleanup(m.stop)
	return m
}

func (m *manager) stop() {
	m.cancel()
	<-m.done
}
