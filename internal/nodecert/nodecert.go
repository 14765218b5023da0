// Package nodecert gets an agent its own mutual-TLS certificate (package
// tlsid) on a cluster, through the Kubernetes CertificateSigningRequest API,
// and renews it, as a kubelet does for its client certificate. It is the
// agent's --tls-issue; the signer is the manager (package agentca).
//
// # Files
//
// The material lives in one directory (the agent's <data-dir>/tls, mode
// 0700), in the layout of package tlsid, which the agent then loads:
//
//	tls.key   this node's private key (ECDSA P-256, PEM, mode 0600)
//	tls.crt   its certificate, signed by the agent CA
//	ca.crt    the CA bundle, copied from the ConfigMap the manager publishes
//	renew-now (optional) present: renew at the next check, then removed
//
// Every file is replaced atomically (temporary file, fsync, rename, fsync
// of the directory). A new key is written only once its certificate was
// issued, key first: a crash between the two leaves a pair that does not
// match, which the next start treats as no certificate (it asks again).
//
// # Issuing
//
// Issue makes a new key and creates a CSR named
// tandem-agent-<node>-<first 12 hex digits of the SHA-256 of the public key>,
// signerName tandem.dev/agent, with the one URI SAN
// spiffe://tandem.dev/node/<node> and the usages digital signature, client
// auth and server auth, then polls it (every PollEvery, at most Wait) until
// it holds a certificate or a Denied or Failed condition, whose message is
// the error. The API server records who asked: the agent's Pod-bound
// ServiceAccount token names its node, and the signer issues nothing for
// another node.
//
// # Renewing
//
// Run renews in the background while the current certificate keeps
// serving: at two thirds of its lifetime, when the ConfigMap's CA bundle
// differs from ca.crt, or when renew-now exists (checked every CheckEvery).
// Each renewal is a new key and a new CSR. A failed renewal is logged and
// retried with a backoff from 10 s up to 5 min; an expired certificate is
// logged as such at each retry. After a renewal the files are written and
// the Source reloaded: new handshakes present the new certificate.
package nodecert

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"

	"github.com/tandem-storage/tandem/internal/agentca"
	"github.com/tandem-storage/tandem/internal/fsutil"
	"github.com/tandem-storage/tandem/internal/pki"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// RenewNowFile is the file whose presence asks for a renewal.
const RenewNowFile = "renew-now"

// Defaults of the Issuer's durations.
const (
	DefaultPollEvery  = 2 * time.Second
	DefaultWait       = 5 * time.Minute
	DefaultCheckEvery = 30 * time.Second
	minBackoff        = 10 * time.Second
	maxBackoff        = 5 * time.Minute
)

// Issuer gets and renews a node's certificate.
type Issuer struct {
	Client    kubernetes.Interface
	Node      string
	Namespace string // of the CA ConfigMap
	ConfigMap string // default agentca.DefaultName
	Dir       string
	Clock     clock.WithTicker // default: the real clock
	Log       logr.Logger
	// ExpirationSeconds, when set, is asked for in the CSR (the signer caps
	// it).
	ExpirationSeconds *int32
	PollEvery         time.Duration
	Wait              time.Duration
	CheckEvery        time.Duration
}

func (i *Issuer) defaults() {
	if i.ConfigMap == "" {
		i.ConfigMap = agentca.DefaultName
	}
	if i.Clock == nil {
		i.Clock = clock.RealClock{}
	}
	if i.PollEvery <= 0 {
		i.PollEvery = DefaultPollEvery
	}
	if i.Wait <= 0 {
		i.Wait = DefaultWait
	}
	if i.CheckEvery <= 0 {
		i.CheckEvery = DefaultCheckEvery
	}
}

// Due is when a certificate valid from notBefore to notAfter is renewed.
func Due(notBefore, notAfter time.Time) time.Time {
	return notBefore.Add(notAfter.Sub(notBefore) * 2 / 3)
}

// Ensure makes Dir hold a certificate of this node that has not expired,
// issuing one when it does not (retrying with backoff until ctx is done).
// A certificate past its renewal time but not expired is kept: Run renews
// it.
func (i *Issuer) Ensure(ctx context.Context) error {
	i.defaults()
	if err := os.MkdirAll(i.Dir, 0o700); err != nil {
		return fmt.Errorf("tls directory: %w", err)
	}
	if leaf, err := i.current(); err == nil && i.Clock.Now().Before(leaf.NotAfter) {
		i.Log.Info("Using this node's TLS certificate", "dir", i.Dir, "serial", leaf.SerialNumber.Text(16), "notAfter", leaf.NotAfter)
		return nil
	} else if err == nil {
		i.Log.Info("This node's TLS certificate has expired; asking for a new one", "notAfter", leaf.NotAfter)
	} else if !errors.Is(err, os.ErrNotExist) {
		i.Log.Info("This node's TLS files are not usable; asking for a new certificate", "reason", err.Error())
	}
	backoff := time.Duration(0)
	for {
		err := i.Issue(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("no TLS certificate for node %s: %w", i.Node, err)
		}
		backoff = next(backoff)
		i.Log.Error(err, "Cannot get this node's TLS certificate; the agent waits for one before serving", "retryIn", backoff)
		if !i.sleep(ctx, backoff) {
			return fmt.Errorf("no TLS certificate for node %s: %w", i.Node, ctx.Err())
		}
	}
}

func next(b time.Duration) time.Duration {
	if b == 0 {
		return minBackoff
	}
	return min(2*b, maxBackoff)
}

func (i *Issuer) sleep(ctx context.Context, d time.Duration) bool {
	t := i.Clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C():
		return true
	}
}

// current returns the certificate in Dir if it matches its key and names
// this node.
func (i *Issuer) current() (*x509.Certificate, error) {
	certPEM, err := os.ReadFile(filepath.Join(i.Dir, tlsid.CertFile))
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(i.Dir, tlsid.KeyFile))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(i.Dir, tlsid.CAFile)); err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	if id, err := tlsid.CertIdentity(leaf); err != nil || id != tlsid.NodeIdentity(i.Node) {
		return nil, fmt.Errorf("%s names %q (%v), want %s", tlsid.CertFile, id, err, tlsid.NodeIdentity(i.Node))
	}
	return leaf, nil
}

// CSRName is the name of the CSR for node's public key (DER).
func CSRName(node string, pubDER []byte) string {
	sum := sha256.Sum256(pubDER)
	if len(node) > 200 {
		node = node[:200]
	}
	return "tandem-agent-" + node + "-" + hex.EncodeToString(sum[:6])
}

// Issue gets a certificate for a new key and writes the files (see the
// package documentation).
func (i *Issuer) Issue(ctx context.Context) error {
	i.defaults()
	caPEM, err := i.caBundle(ctx)
	if err != nil {
		return err
	}
	priv, keyPEM, err := pki.NewKey()
	if err != nil {
		return fmt.Errorf("generate a key: %w", err)
	}
	reqPEM, pubDER, err := request(priv, i.Node)
	if err != nil {
		return err
	}
	name := CSRName(i.Node, pubDER)
	csr := &certv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "agent"}},
		Spec: certv1.CertificateSigningRequestSpec{
			Request:           reqPEM,
			SignerName:        agentca.SignerName,
			ExpirationSeconds: i.ExpirationSeconds,
			Usages:            []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageClientAuth, certv1.UsageServerAuth},
		},
	}
	csrs := i.Client.CertificatesV1().CertificateSigningRequests()
	if _, err := csrs.Create(ctx, csr, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create CSR %s: %w", name, err)
	}
	i.Log.Info("Asked for a TLS certificate", "csr", name, "signer", agentca.SignerName)
	var certPEM []byte
	err = wait.PollUntilContextTimeout(ctx, i.PollEvery, i.Wait, true, func(ctx context.Context) (bool, error) {
		got, err := csrs.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) {
				return false, fmt.Errorf("CSR %s was deleted before it was signed", name)
			}
			return false, nil // transient: poll again
		}
		for _, c := range got.Status.Conditions {
			if c.Type == certv1.CertificateDenied || c.Type == certv1.CertificateFailed {
				return false, fmt.Errorf("CSR %s: %s (%s): %s", name, c.Type, c.Reason, c.Message)
			}
		}
		if len(got.Status.Certificate) == 0 {
			return false, nil
		}
		certPEM = got.Status.Certificate
		return true, nil
	})
	if err != nil {
		if wait.Interrupted(err) && ctx.Err() == nil {
			return fmt.Errorf("CSR %s: not signed within %v (is the manager running with --agent-tls=issue?)", name, i.Wait)
		}
		return err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("CSR %s: the issued certificate: %w", name, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return fmt.Errorf("CSR %s: the issued certificate: %w", name, err)
	}
	if id, err := tlsid.CertIdentity(leaf); err != nil || id != tlsid.NodeIdentity(i.Node) {
		return fmt.Errorf("CSR %s: the issued certificate names %q (%v), want %s", name, id, err, tlsid.NodeIdentity(i.Node))
	}
	for _, f := range []struct {
		name string
		data []byte
		perm os.FileMode
	}{{tlsid.KeyFile, keyPEM, 0o600}, {tlsid.CertFile, certPEM, 0o644}, {tlsid.CAFile, caPEM, 0o644}} {
		if err := fsutil.WriteFileAtomic(filepath.Join(i.Dir, f.name), f.data, f.perm); err != nil {
			return err
		}
	}
	i.Log.Info("Got a TLS certificate", "csr", name, "serial", leaf.SerialNumber.Text(16), "notBefore", leaf.NotBefore, "notAfter", leaf.NotAfter)
	return nil
}

func request(priv *ecdsa.PrivateKey, node string) (reqPEM, pubDER []byte, err error) {
	u, err := url.Parse(string(tlsid.NodeIdentity(node)))
	if err != nil {
		return nil, nil, fmt.Errorf("node %q: %w", node, err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, priv)
	if err != nil {
		return nil, nil, fmt.Errorf("create the certificate request: %w", err)
	}
	pubDER, err = x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), pubDER, nil
}

// caBundle reads the CA bundle from the ConfigMap.
func (i *Issuer) caBundle(ctx context.Context) ([]byte, error) {
	cm, err := i.Client.CoreV1().ConfigMaps(i.Namespace).Get(ctx, i.ConfigMap, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("the agent CA bundle (ConfigMap %s/%s, written by the manager with --agent-tls=issue): %w", i.Namespace, i.ConfigMap, err)
	}
	return caFrom(cm)
}

func caFrom(cm *corev1.ConfigMap) ([]byte, error) {
	b := []byte(cm.Data[agentca.KeyCACert])
	if blk, _ := pem.Decode(b); blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("ConfigMap %s/%s: %s holds no PEM certificate", cm.Namespace, cm.Name, agentca.KeyCACert)
	}
	return b, nil
}

// Run renews the certificate src serves (loaded from Dir) until ctx is
// done; see the package documentation.
func (i *Issuer) Run(ctx context.Context, src *tlsid.Source) {
	i.defaults()
	backoff := time.Duration(0)
	for {
		now := i.Clock.Now()
		due := Due(src.NotBefore(), src.NotAfter())
		d := min(max(due.Sub(now), 0), i.CheckEvery)
		if backoff > 0 {
			d = backoff
		}
		if !i.sleep(ctx, d) {
			return
		}
		reason := i.renewReason(ctx, due)
		if reason == "" {
			continue
		}
		if err := i.Issue(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			backoff = next(backoff)
			kv := []any{"reason", reason, "serial", src.Serial(), "notAfter", src.NotAfter(), "retryIn", backoff}
			if !i.Clock.Now().Before(src.NotAfter()) {
				i.Log.Error(err, "Cannot renew this node's TLS certificate, which HAS EXPIRED: peers refuse it until a renewal succeeds", kv...)
			} else {
				i.Log.Error(err, "Cannot renew this node's TLS certificate; the current one keeps serving", kv...)
			}
			continue
		}
		backoff = 0
		if _, err := src.Reload(); err != nil {
			i.Log.Error(err, "Renewed the TLS certificate but cannot load it; keeping the one loaded before")
			continue
		}
		_ = os.Remove(filepath.Join(i.Dir, RenewNowFile))
		i.Log.Info("Renewed this node's TLS certificate", "reason", reason, "serial", src.Serial(), "notAfter", src.NotAfter())
	}
}

// renewReason says why a renewal is due now, or "".
func (i *Issuer) renewReason(ctx context.Context, due time.Time) string {
	if !i.Clock.Now().Before(due) {
		return "two thirds of the lifetime passed"
	}
	if _, err := os.Stat(filepath.Join(i.Dir, RenewNowFile)); err == nil {
		return "asked for (" + RenewNowFile + ")"
	}
	caPEM, err := i.caBundle(ctx)
	if err != nil {
		return "" // checked again later; the current material keeps serving
	}
	have, err := os.ReadFile(filepath.Join(i.Dir, tlsid.CAFile))
	if err != nil || !bytes.Equal(have, caPEM) {
		return "the CA bundle changed"
	}
	return ""
}
