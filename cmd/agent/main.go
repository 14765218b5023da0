// Command agent is Tandem's per-node dataplane agent: it stores replicas,
// serves the active primary over NBD, mirrors writes to the peer and answers
// the controller's control API (see package dataplane/agent).
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
	"k8s.io/client-go/kubernetes"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/tandem-storage/tandem/dataplane/agent"
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
	opts := zap.Options{TimeEncoder: zapcore.RFC3339NanoTimeEncoder}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	log := zap.New(zap.UseFlagOptions(&opts)).WithName("agent")

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
	acfg := agent.Config{Node: *node, DataDir: *dataDir, Token: token, Log: log}
	if authority != nil {
		acfg.Authority = authority
	}
	a, err := agent.New(acfg)
	if err != nil {
		return err
	}
	defer func() {
		if err := a.Close(); err != nil {
			log.Error(err, "Closing replicas")
		}
	}()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	cl, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		return fmt.Errorf("control listener: %w", err)
	}
	rl, err := net.Listen("tcp", *replAddr)
	if err != nil {
		return fmt.Errorf("replication listener: %w", err)
	}
	nl, err := net.Listen("tcp", *nbdAddr)
	if err != nil {
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
	if leases != nil {
		go agent.Register(ctx, leases, *namespace, *node, ep, log.WithName("register"))
		go authority.Run(ctx, a.Primaries, log.WithName("authority"))
	}

	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
	if *pprofAddr != "" {
		pl, err := net.Listen("tcp", *pprofAddr)
		if err != nil {
			return fmt.Errorf("pprof listener: %w", err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		go func() { _ = http.Serve(pl, mux) }()
	}
	nbdSrv := &nbd.Server{Exports: a, Log: log.WithName("nbd"), AllowedClients: allowed}
	errc := make(chan error, 3)
	go func() { errc <- ignoreClosed(srv.Serve(cl)) }()
	go func() { errc <- a.ServeReplication(ctx, rl) }()
	go func() { errc <- nbdSrv.Serve(ctx, nl) }()
	log.Info("Agent started", "node", *node, "dataDir", *dataDir, "control", cl.Addr().String(),
		"replication", rl.Addr().String(), "nbd", nl.Addr().String(), "auth", token != "", "nbdAllowedClients", *nbdAllowed)

	select {
	case <-ctx.Done():
		log.Info("Shutting down")
	case err = <-errc:
		log.Error(err, "Listener failed; shutting down")
	}
	shutdown(log, srv)
	return err
}

func shutdown(log logr.Logger, srv *http.Server) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Error(err, "Control API shutdown")
	}
}

func ignoreClosed(err error) error {
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
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

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
