// Command manager runs Tandem's controller manager: it registers the
// VolumePair API, serves health and metrics endpoints and, with leader
// election, runs the controllers of package controllers.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/controllers"
	"github.com/tandem-storage/tandem/internal/agentca"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/token"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

func newScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(s))
	utilruntime.Must(storagev1alpha1.AddToScheme(s))
	return s
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "chart-test" {
		os.Exit(chartTestMain(os.Args[2:]))
	}
	var metricsAddr, probeAddr, leaderNamespace, namespace, tokenFile string
	var leaderElect, provision, podFailover, metricsSecure bool
	var metricsCertDir, agentTLSDir, agentTLSMode, agentSA, agentCAName string
	var agentTLSMaxLifetime time.Duration
	var csiEndpoint string
	var leaseDuration, renewDeadline, retryPeriod time.Duration
	var wh webhookFlags
	flag.StringVar(&metricsAddr, "metrics-bind-address", ":8080", "Address the metrics endpoint binds to; 0 disables it.")
	flag.BoolVar(&metricsSecure, "metrics-secure", false, "Serve /metrics over HTTPS to authenticated and authorized clients only: each request's bearer token is checked with a TokenReview and a SubjectAccessReview (get on the non-resource URL /metrics), as kubebuilder v4 projects do. Off: plain HTTP, open to anyone who reaches the port.")
	flag.StringVar(&metricsCertDir, "metrics-cert-dir", "", "With --metrics-secure: directory holding tls.crt and tls.key for /metrics (reloaded when they change); empty or missing files: a self-signed certificate made at start.")
	flag.StringVar(&probeAddr, "health-probe-bind-address", ":8081", "Address the health and readiness probes bind to.")
	flag.BoolVar(&leaderElect, "leader-elect", false, "Elect a leader so only one manager acts at a time.")
	// Shorter than controller-runtime's 15 s/10 s/2 s: when the leader's node
	// is lost, no pair fails over until a standby takes over, so the lease is
	// part of every failover that loses the leader too.
	flag.DurationVar(&leaseDuration, "leader-elect-lease-duration", 8*time.Second, "How long a standby waits after the leader's last renewal before it takes over.")
	flag.DurationVar(&renewDeadline, "leader-elect-renew-deadline", 6*time.Second, "How long the leader retries renewing before it gives up leadership (and exits).")
	flag.DurationVar(&retryPeriod, "leader-elect-retry-period", time.Second, "How often leader election is tried and renewed.")
	flag.StringVar(&leaderNamespace, "leader-election-namespace", "", "Namespace of the leader election Lease (default: the in-cluster namespace).")
	flag.StringVar(&namespace, "namespace", os.Getenv("POD_NAMESPACE"), "Operator namespace: where agents register their Leases and the per-pair authority Leases live.")
	flag.StringVar(&tokenFile, "agent-token-file", "", "File holding the bearer token of the agents' control API.")
	flag.StringVar(&agentTLSDir, "agent-tls-dir", "", "Directory holding the manager's TLS certificate (tls.crt), key (tls.key) and CA bundle (ca.crt) for the agents' control API over HTTPS (agents run with --tls-dir): the certificate must name spiffe://tandem.dev/manager in a URI SAN and allow clientAuth; an agent's certificate must name a node (spiffe://tandem.dev/node/<node>). Read again every 5 s (no restart for a renewal). Empty, and no --agent-tls=issue: agents are called over plain HTTP, and one with --tls-dir or --tls-issue refuses the calls.")
	flag.StringVar(&agentTLSMode, "agent-tls", "", "issue: mutual TLS with the agents from a CA the manager keeps itself (the Secret --agent-ca-name in --namespace, created when absent and never replaced; its certificate is published in the ConfigMap of the same name): the leader approves and signs the agents' CertificateSigningRequests (signer tandem.dev/agent) for the node the requesting Pod runs on only, and every replica signs its own client certificate (spiffe://tandem.dev/manager) in memory, renewed at two thirds of its lifetime. Agents run with --tls-issue. Excludes --agent-tls-dir. Empty: see --agent-tls-dir.")
	flag.StringVar(&agentSA, "agent-service-account", "tandem-agent", "With --agent-tls=issue: the agents' ServiceAccount in --namespace; only its CSRs are signed.")
	flag.StringVar(&agentCAName, "agent-ca-name", agentca.DefaultName, "With --agent-tls=issue: the name of the Secret holding the agent CA and of the ConfigMap publishing its certificate, in --namespace.")
	flag.DurationVar(&agentTLSMaxLifetime, "agent-tls-max-lifetime", agentca.DefaultMaxLifetime, "With --agent-tls=issue: the longest lifetime of a certificate signed for an agent (a CSR's expirationSeconds may ask for less) and the lifetime of the manager's own; at least 10m. Certificates are renewed at two thirds of it; short values make renewals happen within a test.")
	flag.BoolVar(&provision, "csi-controller", true, "Run the CSI driver's controller side on the leader: provision PersistentVolumes for claims of StorageClasses whose provisioner is "+csi.DriverName+", carry out their VolumeAttachments and grow their volumes when their claims ask for more. Off: an external-provisioner, external-attacher and external-resizer do it through --csi-controller-endpoint.")
	flag.BoolVar(&podFailover, "csi-pod-failover", true, "Move the Pods that use a Tandem volume off a lost node once its pair serves elsewhere (the leader only; see docs/install.md, \"When a node is lost\").")
	flag.StringVar(&csiEndpoint, "csi-controller-endpoint", "", "Also serve the CSI identity and controller services on this socket (unix:///path or tcp://host:port), for clusters that run the external-provisioner sidecar instead; empty: not served.")
	flag.IntVar(&wh.port, "webhook-port", 0, "Serve the Pod placement webhook (it prefers the writer's node for Pods that use a Tandem volume) over TLS on this port; 0 disables it.")
	flag.StringVar(&wh.service, "webhook-service", "tandem-webhook", "Name of the Service in front of the webhook (the serving certificate's DNS names).")
	flag.StringVar(&wh.config, "webhook-configuration", "tandem-pod-placement", "MutatingWebhookConfiguration whose caBundle the manager keeps current.")
	flag.StringVar(&wh.secret, "webhook-secret", "tandem-webhook-tls", "Secret in --namespace that holds the webhook's CA and serving certificate (created when absent).")
	opts := zap.Options{}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")

	if namespace == "" {
		log.Error(nil, "--namespace (or POD_NAMESPACE) is required")
		os.Exit(2)
	}
	if leaderElect && !(retryPeriod > 0 && renewDeadline > retryPeriod && leaseDuration > renewDeadline) {
		log.Error(nil, "leader election needs --leader-elect-lease-duration > --leader-elect-renew-deadline > --leader-elect-retry-period > 0",
			"leaseDuration", leaseDuration, "renewDeadline", renewDeadline, "retryPeriod", retryPeriod)
		os.Exit(2)
	}
	if leaderNamespace == "" {
		leaderNamespace = namespace
	}
	cfg := ctrl.GetConfigOrDie()
	var newAgentClient agentapi.NewFunc // nil: the controller's default
	var agentTLS *tlsid.Source
	var agentCA *agentca.CA
	var renewManagerCert func(context.Context, logr.Logger)
	switch {
	case agentTLSMode != "" && agentTLSMode != "issue":
		log.Error(nil, "--agent-tls: want issue or empty", "value", agentTLSMode)
		os.Exit(2)
	case agentTLSMode == "issue" && agentTLSDir != "":
		log.Error(nil, "--agent-tls=issue and --agent-tls-dir exclude each other")
		os.Exit(2)
	case agentTLSMode == "issue" && agentTLSMaxLifetime < agentca.MinLifetime:
		log.Error(nil, "--agent-tls-max-lifetime is below the minimum", "value", agentTLSMaxLifetime, "minimum", agentca.MinLifetime)
		os.Exit(2)
	case agentTLSMode == "issue":
		c, err := client.New(cfg, client.Options{Scheme: newScheme()})
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			agentCA, err = agentca.EnsureCA(ctx, c, namespace, agentCAName, time.Now())
			cancel()
		}
		if err == nil {
			agentTLS, renewManagerCert, err = agentCA.ManagerSource(agentTLSMaxLifetime, clock.RealClock{})
		}
		if err != nil {
			log.Error(err, "Setting up the agent CA (--agent-tls=issue)")
			os.Exit(1)
		}
		log.Info("Mutual TLS with the agents, certificates issued by the manager", "ca", namespace+"/"+agentCAName, "serial", agentTLS.Serial(), "notAfter", agentTLS.NotAfter())
	case agentTLSDir != "":
		var err error
		if agentTLS, err = tlsid.Load(agentTLSDir, tlsid.WithIdentity(tlsid.Manager)); err != nil {
			log.Error(err, "Reading --agent-tls-dir")
			os.Exit(2)
		}
	}
	var tokens *token.Source
	if tokenFile != "" {
		var err error
		if tokens, err = token.FromFile(tokenFile); err != nil {
			log.Error(err, "Reading the agent token")
			os.Exit(2)
		}
	}
	metricsOpts, err := metricsOptions(cfg, metricsAddr, metricsSecure, metricsCertDir)
	if err != nil {
		log.Error(err, "Unable to set up the metrics endpoint")
		os.Exit(1)
	}
	// The manager's context, made before the setup below: the CSI
	// provisioner is built with it (setupCSI).
	ctx := ctrl.SetupSignalHandler()
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  newScheme(),
		Metrics:                 metricsOpts,
		HealthProbeBindAddress:  probeAddr,
		LeaderElection:          leaderElect,
		LeaderElectionID:        "tandem-manager.storage.tandem.dev",
		LeaderElectionNamespace: leaderNamespace,
		LeaseDuration:           &leaseDuration,
		RenewDeadline:           &renewDeadline,
		RetryPeriod:             &retryPeriod,
		// A manager that stops (rolling update, drain) hands leadership over
		// at once instead of making the standby wait out the lease. Safe:
		// main returns right after the manager stops.
		LeaderElectionReleaseOnCancel: true,
		Cache:                         controllers.CacheOptions(namespace),
	})
	if err != nil {
		log.Error(err, "Unable to create the manager")
		os.Exit(1)
	}
	if agentTLS != nil {
		// An agent's certificate must name the node whose Lease advertises
		// the address dialed (read from the manager's cache).
		newAgentClient = agentapi.NewTLSAPIFor(agentDialTLS(agentTLS, mgr.GetClient(), namespace))
	}
	if err := (&controllers.VolumePairReconciler{
		Client:         mgr.GetClient(),
		APIReader:      mgr.GetAPIReader(),
		Recorder:       mgr.GetEventRecorder("tandem-manager"),
		Namespace:      namespace,
		AgentTokens:    tokens,
		NewAgentClient: newAgentClient,
	}).SetupWithManager(mgr); err != nil {
		log.Error(err, "Unable to set up the VolumePair controller")
		os.Exit(1)
	}
	if agentCA != nil {
		if err := (&agentca.Signer{
			Client: mgr.GetClient(), CA: agentCA,
			Policy: agentca.Policy{Username: agentca.ServiceAccountUser(namespace, agentSA), MaxLifetime: agentTLSMaxLifetime},
		}).SetupWithManager(mgr); err != nil {
			log.Error(err, "Unable to set up the agent CSR signer")
			os.Exit(1)
		}
	}
	if provision || podFailover || csiEndpoint != "" {
		if err := setupCSI(ctx, mgr, namespace, provision, podFailover, csiEndpoint); err != nil {
			log.Error(err, "Unable to set up the CSI driver")
			os.Exit(1)
		}
	}
	if wh.port != 0 {
		if err := setupWebhook(mgr, namespace, wh); err != nil {
			log.Error(err, "Unable to set up the Pod placement webhook")
			os.Exit(1)
		}
	}
	// The token file and the TLS files are reloaded while the manager
	// runs: a rotation (packages token, tlsid) needs no restart.
	if err := mgr.Add(everyReplica(func(ctx context.Context) error {
		var wg sync.WaitGroup
		wg.Go(func() { agentTLS.Watch(ctx, tlsid.ReloadEvery, log.WithName("agent-tls")) })
		if renewManagerCert != nil {
			wg.Go(func() { renewManagerCert(ctx, log.WithName("agent-tls")) })
		}
		tokens.Watch(ctx, token.ReloadEvery, log.WithName("token"))
		wg.Wait()
		return nil
	})); err != nil {
		log.Error(err, "Unable to watch the token file")
		os.Exit(1)
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		log.Error(err, "Unable to add the health check")
		os.Exit(1)
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		log.Error(err, "Unable to add the readiness check")
		os.Exit(1)
	}
	log.Info("Starting the manager")
	if err := mgr.Start(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "manager: %v\n", err)
		os.Exit(1)
	}
}

// metricsOptions configures the metrics endpoint. Secure: HTTPS, and the
// filter controller-runtime offers for it, which authenticates the caller's
// bearer token with a TokenReview and authorizes "get" on the non-resource
// URL /metrics with a SubjectAccessReview (the manager's ClusterRole needs
// create on both; a scraper needs a ClusterRole like the chart's
// <fullname>-metrics-reader).
func metricsOptions(cfg *rest.Config, addr string, secure bool, certDir string) (metricsserver.Options, error) {
	o := metricsserver.Options{BindAddress: addr}
	if !secure {
		return o, nil
	}
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return o, fmt.Errorf("an HTTP client for the authentication and authorization filter: %w", err)
	}
	f, err := filters.WithAuthenticationAndAuthorization(cfg, httpClient)
	if err != nil {
		return o, err
	}
	o.SecureServing = true
	o.FilterProvider = func(*rest.Config, *http.Client) (metricsserver.Filter, error) { return f, nil }
	// Plain HTTP/2 has had denial-of-service issues (CVE-2023-44487,
	// CVE-2023-39325); Prometheus speaks HTTP/1.1.
	o.TLSOpts = []func(*tls.Config){func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} }}
	if certDir != "" {
		o.CertDir = certDir
	}
	return o, nil
}

// everyReplica is a Runnable that runs on every manager replica, not only
// the leader (a standby must hold the current token when it takes over).
type everyReplica manager.RunnableFunc

func (f everyReplica) Start(ctx context.Context) error { return f(ctx) }

// NeedLeaderElection implements manager.LeaderElectionRunnable.
func (everyReplica) NeedLeaderElection() bool { return false }
