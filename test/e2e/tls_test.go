//go:build e2e

package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/agentca"
	"github.com/tandem-storage/tandem/internal/pki"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// installCA reads the agents' CA from its Secret, as an administrator can.
func installCA(t *testing.T) *agentca.CA {
	t.Helper()
	out := mustKubectl(t, "-n", "tandem-system", "get", "secret", "tandem-agent-ca", "-o", "jsonpath={.data}")
	var data map[string]string
	if err := json.Unmarshal([]byte(out), &data); err != nil {
		t.Fatalf("decode Secret tandem-agent-ca: %v", err)
	}
	raw := map[string][]byte{}
	for k, v := range data {
		b, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			t.Fatal(err)
		}
		raw[k] = b
	}
	ca, err := agentca.CAFromSecret(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "tandem-system", Name: "tandem-agent-ca"}, Data: raw})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

var (
	managerTLSMu  sync.Mutex
	managerTLSCfg *tls.Config
	managerTLSCA  []byte
)

// managerTLS is a client config with the manager's identity, signed by the
// install's CA: what the stories use to call agents that serve HTTPS.
func managerTLS(t *testing.T) *tls.Config {
	t.Helper()
	managerTLSMu.Lock()
	defer managerTLSMu.Unlock()
	ca := installCA(t)
	if managerTLSCfg != nil && string(managerTLSCA) == string(ca.PEM) {
		return managerTLSCfg
	}
	cfg, err := ca.ManagerClientTLS(time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	managerTLSCfg, managerTLSCA = cfg, ca.PEM
	return managerTLSCfg
}

// nodeCredentials is a client config holding a certificate of the
// install's CA that names node: what that node's agent holds.
func nodeCredentials(t *testing.T, node string) *tls.Config {
	t.Helper()
	ca := installCA(t)
	priv, keyPEM, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(string(tlsid.NodeIdentity(node)))
	certPEM, err := pki.Sign(&x509.Certificate{
		Subject: pkix.Name{CommonName: "tandem-agent:" + node}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}, priv.Public(), ca.Cert, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	src, err := tlsid.FromPEM(certPEM, keyPEM, ca.PEM, tlsid.WithIdentity(tlsid.NodeIdentity(node)))
	if err != nil {
		t.Fatal(err)
	}
	return src.ClientConfig(nil)
}

// agentClient calls a node's agent at the control endpoint its Lease
// advertises, over HTTPS with the manager's identity when it serves TLS.
func agentClient(t *testing.T, node string) (*agentapi.Client, error) {
	out, err := kubectl(t, "-n", "tandem-system", "get", "lease", v1.AgentLeaseName(node), "-o", "jsonpath={.metadata.annotations.storage\\.tandem\\.dev/control-endpoint}")
	if err != nil {
		return nil, fmt.Errorf("%w: %s", err, strings.TrimSpace(out))
	}
	ep := strings.TrimSpace(out)
	c := agentapi.NewClient(ep, agentToken)
	if strings.HasPrefix(ep, "https://") {
		c.HTTP.Transport = agentapi.TLSTransport(managerTLS(t))
	}
	return c, nil
}

// agentInfo is a node's agent's /v1/info.
func agentInfo(t *testing.T, node string) (agentapi.Info, error) {
	c, err := agentClient(t, node)
	if err != nil {
		return agentapi.Info{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Info(ctx)
}

// setInstallTLS switches the running install to mutual TLS (on) or back,
// and waits until the manager and every agent run the new way.
func setInstallTLS(t *testing.T, on bool) {
	t.Helper()
	var cmd *exec.Cmd
	if os.Getenv("TANDEM_INSTALL") == "helm" {
		cmd = exec.Command(filepath.Join(bin, "helm"), "--kubeconfig", kubeconfig, "upgrade", "tandem", filepath.Join(root, "charts", "tandem"),
			"-n", "tandem-system", "--reuse-values", fmt.Sprintf("--set=tls.enabled=%t", on), "--set=tls.maxLifetime=10m")
	} else {
		dir := "install"
		if on {
			dir = "install-tls"
		}
		cmd = exec.Command(filepath.Join(bin, "kubectl"), "--kubeconfig", kubeconfig, "apply", "-k", filepath.Join(root, "hack", "localcluster", dir))
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	for _, r := range []string{"deployment/tandem-manager", "daemonset/tandem-agent"} {
		if out, err := kubectl(t, "-n", "tandem-system", "rollout", "status", r, "--timeout=240s"); err != nil {
			t.Fatalf("rollout of %s: %v\n%s", r, err, out)
		}
	}
	want := "http://"
	if on {
		want = "https://"
	}
	testkit.Eventually(t, 120*time.Second, "every agent registered anew, control API "+want, func() (bool, string) {
		var notYet []string
		for _, n := range []string{"node-a", "node-b", "node-c"} {
			info, err := agentInfo(t, n)
			c, _ := agentClient(t, n)
			if err != nil || c == nil || !strings.HasPrefix(c.BaseURL, want) || (info.TLS != nil) != on {
				notYet = append(notYet, fmt.Sprintf("%s (%v, tls %+v)", n, err, info.TLS))
			}
		}
		return len(notYet) == 0, strings.Join(notYet, "; ")
	}, testkit.Every(time.Second))
}

// Story 23 (issue #18): mutual TLS with per-node certificates. The install
// is switched to it while running: the manager issues each agent a
// certificate naming its node (through a CertificateSigningRequest it
// signs only for the node the requesting Pod runs on), a Sync pair
// replicates over it, node-a's certificate is renewed while fio writes —
// no failover, no I/O error, replicas identical — and the agents refuse
// callers without the manager's identity.
func TestStory23MutualTLS(t *testing.T) {
	requireKubeletNodes(t)
	setInstallTLS(t, true)
	csiRestarted := false
	t.Cleanup(func() {
		setInstallTLS(t, false)
		if csiRestarted {
			restartCSINode(t)
		}
	})

	// Each agent holds a certificate of its own node, from a signed CSR.
	for _, n := range []string{"node-a", "node-b", "node-c"} {
		info, err := agentInfo(t, n)
		if err != nil || info.TLS == nil || info.TLS.Identity != string(tlsid.NodeIdentity(n)) {
			t.Fatalf("agent of %s: %+v %v, want the identity %s", n, info.TLS, err, tlsid.NodeIdentity(n))
		}
	}
	csrs := mustKubectl(t, "get", "csr", "-l", "app.kubernetes.io/component=agent", "-o",
		`jsonpath={range .items[*]}{.spec.signerName} {.spec.username} {.status.conditions[0].type} {.status.certificate}{"\n"}{end}`)
	signed := 0
	for _, l := range strings.Split(strings.TrimSpace(csrs), "\n") {
		f := strings.Fields(l)
		if len(f) == 4 && f[0] == "tandem.dev/agent" && f[1] == "system:serviceaccount:tandem-system:tandem-agent" && f[2] == "Approved" {
			signed++
		}
	}
	if signed < 3 {
		t.Fatalf("%d signed agent CSRs, want one per node at least:\n%s", signed, csrs)
	}

	s := newStory(t, "secure")
	s.apply(s.pairManifest("Sync", "node-a", "node-b", "256Mi", ""))
	vp := s.wait(90*time.Second, "PAIR in sync over mutual TLS", inSync("node-a"))
	epoch := vp.Status.Epoch

	// node-a's certificate is renewed while fio writes.
	before, err := agentInfo(t, "node-a")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	done := make(chan fioRun, 1)
	go func() { done <- runFio(ctx, vp.Status.Endpoint, 60*time.Second, 300) }()
	renew := filepath.Join(root, ".local", "nodes", "node-a", "root", "var", "lib", "tandem", "tls", "renew-now")
	if err := os.WriteFile(renew, nil, 0o600); err != nil {
		t.Fatalf("ask node-a's agent to renew: %v", err)
	}
	var after agentapi.Info
	testkit.Eventually(t, 50*time.Second, "node-a presenting a new certificate", func() (bool, string) {
		after, err = agentInfo(t, "node-a")
		return err == nil && after.TLS != nil && after.TLS.Serial != before.TLS.Serial, fmt.Sprintf("%+v %v", after.TLS, err)
	}, testkit.Every(time.Second))
	r := <-done
	if r.failure != "" {
		t.Fatalf("fio across the renewal: %s", r.failure)
	}
	vp = s.get()
	if vp.Status.Epoch != epoch || vp.Status.ActivePrimary != "node-a" {
		t.Fatalf("after the renewal: writer %s at epoch %d, want node-a at %d (no failover)", vp.Status.ActivePrimary, vp.Status.Epoch, epoch)
	}
	if ev, _ := kubectl(t, "get", "events", "-n", s.ns, "--field-selector", "reason=Failover", "-o", "name"); strings.TrimSpace(ev) != "" {
		t.Fatalf("a Failover event during the renewal: %s", ev)
	}
	s.identical("node-a", "node-b")

	// Callers without the manager's identity are refused.
	c, err := agentClient(t, "node-b")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		tls  *tls.Config
		want int
	}{
		{"no client certificate", &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}, http.StatusForbidden},
		{"node-c's credentials", nodeCredentials(t, "node-c"), http.StatusForbidden},
	} {
		other := agentapi.NewClient(c.BaseURL, agentToken)
		other.HTTP.Transport = agentapi.TLSTransport(tt.tls)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := other.Put(ctx, s.ns, s.name, agentapi.VolumeRequest{Size: 256 << 20, RegionSize: 64 << 10,
			Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: uint64(epoch) + 5, Mode: agentapi.ModeSync}})
		cancel()
		var ae *agentapi.APIError
		if !errors.As(err, &ae) || ae.Code != tt.want {
			t.Fatalf("%s: PUT on node-b's agent answered %v, want HTTP %d", tt.name, err, tt.want)
		}
	}
	plain := agentapi.NewClient("http://"+strings.TrimPrefix(c.BaseURL, "https://"), agentToken)
	if _, err := plain.Info(context.Background()); err == nil {
		t.Fatal("plain HTTP to node-b's control API (it serves HTTPS) was answered")
	}
	if vp := s.get(); vp.Status.Epoch != epoch || vp.Status.ActivePrimary != "node-a" {
		t.Fatalf("the refused calls changed the pair: writer %s at epoch %d", vp.Status.ActivePrimary, vp.Status.Epoch)
	}

	// NBD over TLS. A GnuTLS client (nbdinfo) upgrades with STARTTLS: the
	// certificate node-a's agent got names its address, which nbdinfo
	// checks.
	nbdinfo := nbdinfoTLS(t, vp.Status.Endpoint)

	// The CSI node plugin attaches a claim's volume over TLS with its
	// node's agent certificate. Its DaemonSet updates OnDelete: its Pods
	// are replaced to take the TLS install's arguments.
	restartCSINode(t)
	csiRestarted = true
	// (The claim's volume is a pair of its own in tandem-system; the
	// recorder runs in the story's namespace.)
	s.startRecorder("node-a", "node-b", "", "64Mi")
	pod := s.waitRecorder(20)
	plugin := strings.TrimSpace(mustKubectl(t, "-n", "tandem-system", "get", "pods", "-l", "app.kubernetes.io/component=csi-node",
		"--field-selector", "spec.nodeName="+pod.Spec.NodeName, "-o", "jsonpath={.items[0].metadata.name}"))
	logs := mustKubectl(t, "-n", "tandem-system", "logs", plugin)
	want := `"NBD connections use TLS"`
	if !strings.Contains(logs, want) || !strings.Contains(logs, string(tlsid.NodeIdentity(pod.Spec.NodeName))) {
		t.Fatalf("the CSI node plugin on %s attached without TLS (no %s naming its node in its log):\n%s", pod.Spec.NodeName, want, logs)
	}
	// The Pod stops and the volume is detached before the install goes
	// back to plain text: a node plugin upgrading with STARTTLS cannot
	// reconnect to agents that no longer offer it (docs/install.md).
	mustKubectl(t, "scale", "statefulset", "recorder", "-n", s.ns, "--replicas=0")
	testkit.Eventually(t, 120*time.Second, "recorder-0 gone and its volume detached by the node plugin", func() (bool, string) {
		_, running := podOf(t, s.ns, "recorder-0")
		logs, _ := kubectl(t, "-n", "tandem-system", "logs", plugin)
		return !running && strings.Contains(logs, `"Volume detached"`), fmt.Sprintf("pod running %t", running)
	}, testkit.Every(time.Second))

	t.Logf("STORY 23 mutual TLS: each agent holds its node's certificate (%d CSRs signed); node-a's renewed (serial %s → %s) while fio wrote (%d I/Os, no error), no failover, replicas identical; no client certificate and node-c's credentials refused (403), plain HTTP refused; NBD over TLS: %s; a claim's volume attached over TLS by the CSI node plugin on %s, records acknowledged",
		signed, before.TLS.Serial, after.TLS.Serial, r.ios, nbdinfo, pod.Spec.NodeName)
}

// nbdinfoTLS runs nbdinfo over nbds:// against an NBD endpoint
// (nbd://host:port/export) with a manager certificate of the install's CA,
// and returns what it says of the export.
func nbdinfoTLS(t *testing.T, endpoint string) string {
	t.Helper()
	ca := installCA(t)
	certPEM, keyPEM, err := ca.ManagerCert(time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for name, b := range map[string][]byte{"ca-cert.pem": ca.PEM, "client-cert.pem": certPEM, "client-key.pem": keyPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	uri := "nbds://" + strings.TrimPrefix(endpoint, "nbd://") + "?tls-certificates=" + dir
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nbdinfo", "--json", uri).CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"export-size"`) {
		t.Fatalf("nbdinfo %s: %v\n%s", uri, err, out)
	}
	var info struct {
		Exports []struct {
			Size int64 `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal(out, &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo %s: %v\n%s", uri, err, out)
	}
	return fmt.Sprintf("nbdinfo over nbds:// saw %d bytes", info.Exports[0].Size)
}

// restartCSINode replaces every CSI node plugin Pod (the DaemonSet updates
// OnDelete) and waits until each node runs a new one that is ready.
func restartCSINode(t *testing.T) {
	t.Helper()
	since := time.Now().Add(-time.Second)
	if out, err := kubectl(t, "-n", "tandem-system", "delete", "pods", "-l", "app.kubernetes.io/component=csi-node", "--wait=true", "--timeout=90s"); err != nil {
		t.Fatalf("delete the CSI node plugin Pods: %v\n%s", err, out)
	}
	testkit.Eventually(t, 120*time.Second, "a new CSI node plugin Pod ready on every node", func() (bool, string) {
		out, err := kubectl(t, "-n", "tandem-system", "get", "pods", "-l", "app.kubernetes.io/component=csi-node", "-o",
			`jsonpath={range .items[*]}{.spec.nodeName} {.metadata.creationTimestamp} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
		if err != nil {
			return false, out
		}
		ready := map[string]bool{}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			f := strings.Fields(l)
			if len(f) != 3 {
				continue
			}
			created, err := time.Parse(time.RFC3339, f[1])
			if err == nil && !created.Before(since.Truncate(time.Second)) && f[2] == "True" {
				ready[f[0]] = true
			}
		}
		return len(ready) == 3, out
	}, testkit.Every(time.Second))
}
