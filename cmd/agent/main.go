// Command agent is Tandem's per-node dataplane agent: it stores replicas,
// serves the active primary over NBD, mirrors writes to the peer and answers
// the controller's control API (package dataplane/agent; the API itself:
// package pkg/agentapi).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/zap/zapcore"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/budget"
	"github.com/tandem-storage/tandem/dataplane/nbd"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "tandem agent: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	host, _ := os.Hostname()
	node := flag.String("node", envOr("NODE_NAME", host), "This agent's Kubernetes node name.")
	dataDir := flag.String("data-dir", "/var/lib/tandem", "Directory holding the replicas.")
	controlAddr := flag.String("control-address", ":7400", "Listen address of the control API (HTTP).")
	replAddr := flag.String("replication-address", ":7401", "Listen address of the replication link.")
	nbdAddr := flag.String("nbd-address", ":10809", "Listen address of the NBD server.")
	tokenFile := flag.String("token-file", "", "File holding the shared bearer token for the control API and replication; required unless --insecure-no-auth.")
	noAuth := flag.Bool("insecure-no-auth", false, "Run without authentication (tests on loopback only).")
	namespace := flag.String("namespace", os.Getenv("POD_NAMESPACE"), "Operator namespace: the agent registers its Lease there and renews the authority Leases of the volumes it serves. Empty: no Kubernetes (standalone, the control API's word is final).")
	kubeconfig := flag.String("kubeconfig", "", "Kubeconfig file (default: in-cluster config).")
	advertise := flag.String("advertise-address", os.Getenv("POD_IP"), "Address peers and clients use to reach this agent (default: the listen addresses' host, or 127.0.0.1).")
	kubeQPS := flag.Float64("kube-api-qps", 50, "Requests per second to the Kubernetes API server (client-side limit). The agent renews one authority Lease per primary volume every second, plus its own Lease: keep this above the number of primaries per node.")
	kubeBurst := flag.Int("kube-api-burst", 100, "Burst of requests to the Kubernetes API server above --kube-api-qps.")
	nbdAllowed := flag.String("nbd-allowed-clients", "", "Comma-separated client networks (CIDR prefixes or addresses) allowed to connect to the NBD port; others are refused before the handshake. Empty: any client (firewall the port then).")
	pprofAddr := flag.String("pprof-address", "", "Serve Go profiles (net/http/pprof) on this address; off when empty. Bind it to localhost.")
	maxInflight := quantityFlag("max-inflight-bytes", 256<<20, "Memory budget for in-flight request data, shared by every NBD connection (read buffers, write payloads until replicated) and the requests a peer forwards. A request that does not fit waits for earlier ones. "+
		"Keep it well under the container's memory limit: the agent also holds bitmaps (32 MiB per TiB at 4 KiB regions), up to 64 MiB of replication queue per primary and 16 MiB of resync per copy, and Go's collector lets the heap grow to about twice what is live; the default 256Mi fits the shipped 1Gi limit. Accepts a quantity (256Mi, 1Gi) or bytes.")
	opts := zap.Options{TimeEncoder: zapcore.RFC3339NanoTimeEncoder}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	log := zap.New(zap.UseFlagOptions(&opts)).WithName("agent")
	if *maxInflight < 1<<20 {
		return fmt.Errorf("--max-inflight-bytes=%d: want at least 1Mi", *maxInflight)
	}

	var token string
	switch {
	case *tokenFile != "":
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return fmt.Errorf("read token file: %w", err)
		}
		token = strings.TrimSpace(string(b))
		if token == "" {
			return fmt.Errorf("token file %s is empty", *tokenFile)
		}
	case !*noAuth:
		return errors.New("--token-file is required (or --insecure-no-auth for loopback tests)")
	}

	allowed, err := nbd.ParseAllowedClients(*nbdAllowed)
	if err != nil {
		return fmt.Errorf("--nbd-allowed-clients: %w", err)
	}

	var leases coordclient.LeasesGetter
	var authority *agent.KubeAuthority
	if *namespace != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
		if err != nil {
			return fmt.Errorf("kubernetes client config: %w", err)
		}
		// client-go's defaults (5/s, burst 10) starve the authority
		// renewals of a node with a few primaries: their Leases would
		// lapse and the volumes fence themselves.
		cfg.QPS, cfg.Burst = float32(*kubeQPS), *kubeBurst
		cs, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		leases = cs.CoordinationV1()
		authority = agent.NewKubeAuthority(leases, *namespace, *node)
	} else {
		log.Info("No --namespace: running without Kubernetes; writes are gated only by the control API")
	}
	bud := budget.New(*maxInflight)
	acfg := agent.Config{Node: *node, DataDir: *dataDir, Token: token, Budget: bud, Log: log}
	if authority != nil {
		acfg.Authority = authority
	}
	a, err := agent.New(acfg)
	if err != nil {
		return err
	}
	closeReplicas := func() {
		if err := a.Close(); err != nil {
			log.Error(err, "Closing replicas")
		}
	}

	sigCtx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stopSignals()

	cl, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		closeReplicas()
		return fmt.Errorf("control listener: %w", err)
	}
	rl, err := net.Listen("tcp", *replAddr)
	if err != nil {
		closeReplicas()
		return fmt.Errorf("replication listener: %w", err)
	}
	nl, err := net.Listen("tcp", *nbdAddr)
	if err != nil {
		closeReplicas()
		return fmt.Errorf("NBD listener: %w", err)
	}
	absDataDir, err := filepath.Abs(*dataDir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	ep := agent.Endpoints{
		Control:     "http://" + advertised(*advertise, cl.Addr()),
		Replication: advertised(*advertise, rl.Addr()),
		NBD:         advertised(*advertise, nl.Addr()),
		DataDir:     absDataDir, // named in TeardownIncomplete events
	}
	a.SetAddresses(ep.NBD, ep.Replication, ep.Control)
	// Registration and the authority renewals outlive the listeners: the
	// writes drained at shutdown still need the authority (else they fail
	// as fenced) until the replicas are closed.
	leaseCtx, stopLeases := context.WithCancel(context.Background())
	defer stopLeases()
	if leases != nil {
		go agent.Register(leaseCtx, leases, *namespace, *node, ep, log.WithName("register"))
		go authority.Run(leaseCtx, a.Primaries, log.WithName("authority"))
	}

	if *pprofAddr != "" {
		pl, err := net.Listen("tcp", *pprofAddr)
		if err != nil {
			closeReplicas()
			return fmt.Errorf("pprof listener: %w", err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		go func() { _ = http.Serve(pl, mux) }()
	}
	nbdSrv := &nbd.Server{Exports: a, Log: log.WithName("nbd"), AllowedClients: allowed, Budget: bud}
	nbdSvc := start("NBD server", func(ctx context.Context) error { return nbdSrv.Serve(ctx, nl) })
	replSvc := start("replication listener", func(ctx context.Context) error { return a.ServeReplication(ctx, rl) })
	ctrlSvc := start("control API", func(ctx context.Context) error { return a.ServeControl(ctx, cl, agent.ControlLimits{}) })
	log.Info("Agent started", "node", *node, "dataDir", *dataDir, "control", cl.Addr().String(),
		"replication", rl.Addr().String(), "nbd", nl.Addr().String(), "auth", token != "", "nbdAllowedClients", *nbdAllowed,
		"maxInflightBytes", *maxInflight)

	select {
	case <-sigCtx.Done():
		log.Info("Shutting down")
	case err = <-nbdSvc.done:
		err = nbdSvc.exited(err)
	case err = <-replSvc.done:
		err = replSvc.exited(err)
	case err = <-ctrlSvc.done:
		err = ctrlSvc.exited(err)
	}
	if err != nil {
		log.Error(err, "Listener failed; shutting down")
	}

	// Finding 8 of issue #12: the order that loses nothing. First no new
	// NBD connections, and the requests in flight finish (up to the NBD
	// server's drain timeout, then they are cancelled); then the replicas
	// close, each waiting for its admitted writes before its final
	// checkpoint, so a write that reached the local disk but not the peer
	// is dirty after the restart; then the other listeners and the lease
	// renewals stop. At worst 13 + 2 + 6 (volume.Options.CloseTimeout and
	// the checkpoint loop) + 3 s, under the DaemonSet's 30 s grace period.
	if !nbdSvc.stop(log, nbd.DefaultDrainTimeout+3*time.Second) {
		log.Error(errors.New("NBD connections still open"), "Closing the replicas with NBD requests still running")
	}
	replSvc.stop(log, 2*time.Second)
	closeReplicas()
	log.Info("Replicas closed")
	ctrlSvc.stop(log, 3*time.Second)
	stopLeases()
	return err
}

// service is a listener's serve loop run in its own goroutine.
type service struct {
	name   string
	cancel context.CancelFunc
	done   chan error
	ended  bool
}

func start(name string, serve func(ctx context.Context) error) *service {
	ctx, cancel := context.WithCancel(context.Background())
	s := &service{name: name, cancel: cancel, done: make(chan error, 1)}
	go func() { s.done <- serve(ctx) }()
	return s
}

// exited records that the serve loop returned on its own with err (which
// the caller received), and returns why.
func (s *service) exited(err error) error {
	s.ended = true
	if err == nil {
		err = fmt.Errorf("%s stopped", s.name)
	}
	return err
}

// stop cancels the serve loop and waits up to d for it to return; it
// reports whether it did.
func (s *service) stop(log logr.Logger, d time.Duration) bool {
	s.cancel()
	if s.ended {
		return true
	}
	select {
	case err := <-s.done:
		s.ended = true
		if err != nil {
			log.Error(err, "Stopped with an error", "service", s.name)
		} else {
			log.Info("Stopped", "service", s.name)
		}
		return true
	case <-time.After(d):
		log.Error(errors.New("still running"), "Gave up waiting", "service", s.name, "after", d.String())
		return false
	}
}

// advertised joins the advertise host (or the listener's own host, or
// 127.0.0.1 for a wildcard) with the listener's port.
func advertised(host string, addr net.Addr) string {
	h, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	if host == "" {
		host = h
		if ip := net.ParseIP(h); ip == nil || ip.IsUnspecified() {
			host = "127.0.0.1"
		}
	}
	return net.JoinHostPort(host, port)
}

// quantityFlag defines a flag of bytes written as a Kubernetes quantity
// ("256Mi", "1Gi") or a plain number.
func quantityFlag(name string, def int64, usage string) *int64 {
	v := def
	flag.Func(name, usage+fmt.Sprintf(" (default %s)", resource.NewQuantity(def, resource.BinarySI)), func(s string) error {
		q, err := resource.ParseQuantity(s)
		if err != nil {
			return err
		}
		n, ok := q.AsInt64()
		if !ok || n <= 0 {
			return fmt.Errorf("%q is not a positive number of bytes", s)
		}
		v = n
		return nil
	})
	return &v
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
