// Command agent is Tandem's per-node dataplane agent: it stores replicas,
// serves the active primary over NBD, mirrors writes to the peer and answers
// the controller's control API (package dataplane/agent; the API itself:
// package pkg/agentapi).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"

	"go.uber.org/zap/zapcore"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	coordclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	coreclient "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/budget"
	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/internal/fsutil"
	"github.com/tandem-storage/tandem/internal/nodecert"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/token"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "csi-node" {
		if err := runCSINode(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "tandem csi-node: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "tandem agent: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	host, _ := os.Hostname()
	// A flag set of its own: packages the agent links register flags of
	// theirs on flag.CommandLine (controller-runtime's --kubeconfig).
	fs := flag.NewFlagSet("agent", flag.ExitOnError)
	node := fs.String("node", envOr("NODE_NAME", host), "This agent's Kubernetes node name.")
	dataDir := fs.String("data-dir", "/var/lib/tandem", "Directory holding the replicas.")
	controlAddr := fs.String("control-address", ":7400", "Listen address of the control API (HTTP).")
	replAddr := fs.String("replication-address", ":7401", "Listen address of the replication link.")
	nbdAddr := fs.String("nbd-address", ":10809", "Listen address of the NBD server.")
	tokenFile := fs.String("token-file", "", "File holding the shared bearer token for the control API and replication; required unless --insecure-no-auth.")
	tlsDir := fs.String("tls-dir", "", "Directory holding this node's TLS certificate (tls.crt, its chain may follow), key (tls.key) and CA bundle (ca.crt): a kubernetes.io/tls Secret or a cert-manager Certificate mounted as a volume. The certificate must name this node in a URI SAN spiffe://tandem.dev/node/<node> and allow serverAuth and clientAuth. Set: the replication link is mutual TLS (a primary's certificate must name the node its Hello names; a backup's the node the spec names at its address), and the control API is HTTPS (/v1 needs a client certificate of the CA, only spiffe://tandem.dev/manager may change anything; the probes need none), both on top of the token. The files are read again every 5 s: a renewed certificate or CA bundle is used by new connections without a restart. Empty, and no --tls-issue: plaintext.")
	tlsIssue := fs.Bool("tls-issue", false, "Get this node's TLS certificate from the cluster instead of --tls-dir (which it excludes; needs --namespace): the agent keeps a key in <data-dir>/tls, asks for a certificate naming spiffe://tandem.dev/node/<node> with a CertificateSigningRequest (signer tandem.dev/agent; the manager signs it with --agent-tls=issue, only for the node this Pod runs on), copies the CA bundle from the ConfigMap --tls-ca-configmap, waits for the certificate before serving, and renews it in the background at two thirds of its lifetime, when the CA bundle changes, or when the file <data-dir>/tls/renew-now appears (checked every 30 s). Then mutual TLS as with --tls-dir.")
	tlsCAConfigMap := fs.String("tls-ca-configmap", "tandem-agent-ca", "With --tls-issue: the ConfigMap in --namespace holding the agent CA bundle (key ca.crt), written by the manager.")
	noAuth := fs.Bool("insecure-no-auth", false, "Run without authentication (tests on loopback only).")
	namespace := fs.String("namespace", os.Getenv("POD_NAMESPACE"), "Operator namespace: the agent registers its Lease there and renews the authority Leases of the volumes it serves. Empty: no Kubernetes (standalone, the control API's word is final).")
	kubeconfig := fs.String("kubeconfig", "", "Kubeconfig file (default: in-cluster config).")
	advertise := fs.String("advertise-address", os.Getenv("POD_IP"), "Address peers and clients use to reach this agent (default: the listen addresses' host, or 127.0.0.1).")
	kubeQPS := fs.Float64("kube-api-qps", 50, "Requests per second to the Kubernetes API server (client-side limit). The agent renews one authority Lease per primary volume every second, plus its own Lease: keep this above the number of primaries per node.")
	kubeBurst := fs.Int("kube-api-burst", 100, "Burst of requests to the Kubernetes API server above --kube-api-qps.")
	nbdTLS := fs.String("nbd-tls", "offer", "With mutual TLS (--tls-dir or --tls-issue): whether the NBD server offers TLS through NBD_OPT_STARTTLS (offer: clients may upgrade, plain-text ones are still served), requires it (require: every client presents a certificate of the CA naming a Tandem identity, such as the CSI node plugin's) or not (off). Without TLS material the NBD port is plain text.")
	nbdAllowed := fs.String("nbd-allowed-clients", "", "Who may connect to the NBD port, comma-separated: nodes (the cluster's Nodes, their addresses and Pod CIDRs, and loopback, kept current from the API server), CIDR prefixes or addresses, or any (everyone: firewall the port then). Others are refused before the handshake. Default: nodes with Kubernetes (--namespace), any without.")
	handover := fs.Duration("handover-timeout", agent.DefaultHandoverTimeout, "On SIGTERM (a rolling update, a drain), how long to wait for the controller to move this node's writer roles to their peers before shutting down; 0 disables the handover. Keep the Pod's terminationGracePeriodSeconds above this plus 30 s.")
	payloadCRC := fs.Bool("payload-checksums", false, "Ask for a CRC-32C over every replicated payload (Write and CopyData frames), on top of TCP's checksum, on every replication link of this agent; a link uses them when either side asks (DRBD's data-integrity-alg). Off: the frames' checksums cover their headers; costs CPU on both members when on (about a quarter of it for 1 MiB writes).")
	pprofAddr := fs.String("pprof-address", "", "Serve Go profiles (net/http/pprof) on this address; off when empty. Bind it to localhost.")
	addrFile := fs.String("addresses-file", "", "Once serving, write the advertised control, replication and NBD addresses (and the pprof one) as JSON to this file, replaced atomically. With port 0 in the listen addresses, this is how a test harness learns the ports the kernel chose.")
	maxInflight := quantityFlag(fs, "max-inflight-bytes", 256<<20, "Memory budget for in-flight request data, shared by every NBD connection (read buffers, write payloads until replicated) and the requests a peer forwards. A request that does not fit waits for earlier ones. "+
		"Keep it well under the container's memory limit: the agent also holds bitmaps (32 MiB per TiB at 4 KiB regions), up to 64 MiB of replication queue per primary and 16 MiB of resync per copy, and Go's collector lets the heap grow to about twice what is live; the default 256Mi fits the shipped 1Gi limit. Accepts a quantity (256Mi, 1Gi) or bytes.")
	opts := zap.Options{TimeEncoder: zapcore.RFC3339NanoTimeEncoder}
	opts.BindFlags(fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	log := zap.New(zap.UseFlagOptions(&opts)).WithName("agent")
	if procs, changed := setAgentProcs(); changed {
		log.Info("Running with half of this node's CPUs as Go processors; GOMAXPROCS in the environment overrides it", "goProcessors", procs, "cpus", runtime.NumCPU())
	}
	if *maxInflight < 1<<20 {
		return fmt.Errorf("--max-inflight-bytes=%d: want at least 1Mi", *maxInflight)
	}

	var tokens *token.Source
	switch {
	case *tokenFile != "":
		var err error
		if tokens, err = token.FromFile(*tokenFile); err != nil {
			return err
		}
	case !*noAuth:
		return errors.New("--token-file is required (or --insecure-no-auth for loopback tests)")
	}

	if *tlsIssue && *tlsDir != "" {
		return errors.New("--tls-issue and --tls-dir exclude each other")
	}
	if *tlsIssue && *namespace == "" {
		return errors.New("--tls-issue needs Kubernetes (--namespace)")
	}
	nbdTLSMode, err := agent.ParseNBDTLSMode(*nbdTLS)
	if err != nil {
		return fmt.Errorf("--nbd-tls: %w", err)
	}
	if nbdTLSMode == agent.NBDTLSRequire && *tlsDir == "" && !*tlsIssue {
		return errors.New("--nbd-tls=require needs TLS material: --tls-dir or --tls-issue")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	allowSpec := *nbdAllowed
	if allowSpec == "" && *namespace != "" {
		allowSpec = "nodes"
	}
	allowed, err := nbd.ParseAllowList(allowSpec)
	if err != nil {
		return fmt.Errorf("--nbd-allowed-clients: %w", err)
	}
	if allowed.Nodes() && *namespace == "" {
		return errors.New("--nbd-allowed-clients=nodes needs Kubernetes (--namespace): without it the agent cannot know the nodes")
	}

	var leases coordclient.LeasesGetter
	var nodes coreclient.NodesGetter
	var issuer *nodecert.Issuer
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
		leases, nodes = cs.CoordinationV1(), cs.CoreV1()
		if *tlsIssue {
			issuer = &nodecert.Issuer{Client: cs, Node: *node, Namespace: *namespace, ConfigMap: *tlsCAConfigMap,
				Dir: filepath.Join(*dataDir, "tls"), Log: log.WithName("tls")}
		}
	} else {
		log.Info("No --namespace: running without Kubernetes; writes are gated only by the control API")
	}

	var tlsSrc *tlsid.Source
	switch {
	case *tlsDir != "":
		if tlsSrc, err = tlsid.Load(*tlsDir, tlsid.WithIdentity(tlsid.NodeIdentity(*node))); err != nil {
			return fmt.Errorf("--tls-dir: %w", err)
		}
	case issuer != nil:
		// Serving waits for a certificate: the agent logs why meanwhile.
		if err := issuer.Ensure(ctx); err != nil {
			return fmt.Errorf("--tls-issue: %w", err)
		}
		if tlsSrc, err = tlsid.Load(issuer.Dir, tlsid.WithIdentity(tlsid.NodeIdentity(*node))); err != nil {
			return fmt.Errorf("--tls-issue: %w", err)
		}
	}
	if tlsSrc != nil {
		log.Info("Mutual TLS on the replication link and the control API", "nbd", nbdTLSMode, "dir", tlsSrc.Dir(), "identity", tlsSrc.Identity(), "serial", tlsSrc.Serial(), "notAfter", tlsSrc.NotAfter())
	}

	var lns []net.Listener
	listen := func(what, addr string) (net.Listener, error) {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("%s listener: %w", what, err)
		}
		lns = append(lns, l)
		return l, nil
	}
	cl, err := listen("control", *controlAddr)
	if err != nil {
		return err
	}
	rl, err := listen("replication", *replAddr)
	if err != nil {
		return err
	}
	nl, err := listen("NBD", *nbdAddr)
	if err != nil {
		return err
	}
	var pprofBound string
	if *pprofAddr != "" {
		pl, err := listen("pprof", *pprofAddr)
		if err != nil {
			return err
		}
		pprofBound = pl.Addr().String()
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		go func() { _ = http.Serve(pl, mux) }()
	}

	// The token file is reloaded while the agent runs: a rotation (package
	// token) needs no restart.
	go tokens.Watch(ctx, token.ReloadEvery, log.WithName("token"))
	// So are the TLS files (package tlsid); with --tls-issue the issuer
	// renews them and reloads the Source itself (a reload of its own could
	// see a new key before its certificate is written).
	if issuer != nil {
		go issuer.Run(ctx, tlsSrc)
	} else {
		go tlsSrc.Watch(ctx, tlsid.ReloadEvery, log.WithName("tls"))
	}
	// agent.Run shuts the agent down in the order that loses nothing (the
	// writer roles handed over, NBD drain, replication, replicas, control
	// API, then the Lease renewals), within the DaemonSet's 60 s grace
	// period.
	handoverTimeout := *handover
	if handoverTimeout == 0 {
		handoverTimeout = -1 // Options: negative disables
	}
	return agent.Run(ctx, agent.Options{
		Config: agent.Config{Node: *node, DataDir: *dataDir, Tokens: tokens, TLS: tlsSrc, AdvertiseHost: *advertise,
			PayloadChecksums: *payloadCRC, Budget: budget.New(*maxInflight), Log: log},
		Control: cl, Replication: rl, NBD: nl,
		NBDAllow:        allowed,
		NBDTLS:          nbdTLSMode,
		Nodes:           nodes,
		Leases:          leases,
		Namespace:       *namespace,
		HandoverTimeout: handoverTimeout,
		Started: func(_ *agent.Agent, ep agent.Endpoints) {
			if *addrFile == "" {
				return
			}
			b, err := json.Marshal(agentapi.ListenAddresses{Control: ep.Control, Replication: ep.Replication, NBD: ep.NBD, Pprof: pprofBound})
			if err == nil {
				err = fsutil.WriteFileAtomic(*addrFile, b, 0o644)
			}
			if err != nil {
				log.Error(err, "Writing the addresses file", "path", *addrFile)
			}
		},
	})
}

// quantityFlag defines a flag of bytes written as a Kubernetes quantity
// ("256Mi", "1Gi") or a plain number.
func quantityFlag(fs *flag.FlagSet, name string, def int64, usage string) *int64 {
	v := def
	fs.Func(name, usage+fmt.Sprintf(" (default %s)", resource.NewQuantity(def, resource.BinarySI)), func(s string) error {
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
