// Package webhookcert keeps the TLS material of Tandem's mutating admission
// webhook. No cert-manager is assumed: the manager keeps a self-signed CA and
// a serving certificate signed by it in one Secret that all its replicas
// share (Ensure), serves the certificate from memory (Holder), and patches the
// CA into the MutatingWebhookConfiguration's caBundle so that the API server
// trusts the server (PatchCABundle).
//
// # The Secret
//
// The Secret is of type Opaque (kubernetes.io/tls is not required; an
// existing Secret's type is left as it is, since the type is immutable) and
// holds four PEM-encoded keys:
//
//	ca.crt   the CA certificate ("CERTIFICATE"); this is the caBundle
//	ca.key   the CA private key ("EC PRIVATE KEY", SEC 1)
//	tls.crt  the serving certificate ("CERTIFICATE"), signed by the CA
//	tls.key  the serving private key ("EC PRIVATE KEY", SEC 1)
//
// Other keys in the Secret are preserved. Keys generated here are ECDSA
// P-256; stored keys of another type that crypto/tls can parse are accepted.
//
// # Lifetimes and renewal
//
// The CA is valid for 10 years, the serving certificate for 1 year (never
// beyond the CA's expiry). Both start one hour before now, so that replicas
// and API servers whose clocks lag a little accept them at once.
//
// The CA is kept across renewals of the serving certificate, so the caBundle
// stays the same; it is regenerated only when it is missing, cannot be parsed
// (including a ca.key that does not match ca.crt, or a ca.crt that is not a
// CA), or expires within 30 days. A new CA always brings a new serving
// certificate.
//
// The serving certificate is renewed when it is missing or cannot be parsed
// (including a tls.key that does not match tls.crt), when less than 30 days
// of it are left, when its DNS names are not exactly the requested ones, or
// when it is not signed by the stored CA.
//
// # Replicas
//
// Several replicas may call Ensure at once. Every write is conditional
// (Create fails if the Secret exists, Update carries the resourceVersion that
// was read), and the loser re-reads the Secret and starts over, so in the end
// they all use what one of them wrote. The client passed to Ensure should
// read from the API server, not from an informer cache: a stale cache would
// make every retry fail the same way (and the manager's cache is not started
// yet when the webhook server's certificate is first needed).
//
// # Why the standard library
//
// Certificates are generated with crypto/x509, crypto/ecdsa, crypto/rand and
// encoding/pem: controller-runtime has no certificate generation outside its
// envtest package (which is test-only), and cert-manager is not assumed to be
// installed.
package webhookcert

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/tandem-storage/tandem/internal/pki"
)

// Keys of the Secret.
const (
	keyCACert  = "ca.crt"
	keyCAKey   = "ca.key"
	keyTLSCert = "tls.crt"
	keyTLSKey  = "tls.key"
)

const (
	// caValidityYears is how long a new CA is valid.
	caValidityYears = 10
	// servingValidityYears is how long a new serving certificate is valid
	// (at most until the CA expires).
	servingValidityYears = 1
	// renewBefore is how much validity must be left for a certificate to be
	// kept.
	renewBefore = 30 * 24 * time.Hour
	// maxAttempts bounds the re-read-and-retry loops after a lost race.
	maxAttempts = 5
	// caCommonName is the subject of generated CAs.
	caCommonName = "tandem-webhook-ca"
)

// Bundle is what the webhook server needs.
type Bundle struct {
	// CA is the PEM of the CA certificate, exactly as stored in the Secret:
	// the caBundle of the MutatingWebhookConfiguration.
	CA []byte
	// Cert is the serving certificate and its key; Cert.Leaf is set.
	Cert tls.Certificate
	// NotAfter is the expiry of the serving certificate. Calling Ensure
	// again before NotAfter minus 30 days renews it.
	NotAfter time.Time
}

// Ensure reads the Secret key, creates it (type Opaque) when absent, renews
// what is missing, damaged or due (see the package documentation), and
// returns the bundle it stores.
//
// Two replicas may race: a Create that fails with AlreadyExists, or an Update
// that fails with Conflict (or NotFound, the Secret having been deleted
// meanwhile), re-reads the Secret and starts over. After 5 attempts Ensure
// gives up with an error wrapping the last one. A Secret that is already
// right is not written.
//
// dnsNames must be non-empty; the serving certificate's DNS SANs are exactly
// dnsNames and its CommonName is dnsNames[0]. now is the current time
// (injected so that tests can use a fixed clock).
func Ensure(ctx context.Context, c client.Client, key client.ObjectKey, dnsNames []string, now time.Time) (*Bundle, error) {
	if len(dnsNames) == 0 {
		return nil, fmt.Errorf("webhook certificate Secret %s: no DNS names given", key)
	}
	for i, n := range dnsNames {
		if n == "" {
			return nil, fmt.Errorf("webhook certificate Secret %s: DNS name %d is empty", key, i)
		}
	}
	var lastErr error
	for range maxAttempts {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("webhook certificate Secret %s: %w", key, err)
		}
		b, retry, err := ensureOnce(ctx, c, key, dnsNames, now)
		if err == nil {
			return b, nil
		}
		if !retry {
			return nil, err
		}
		lastErr = err
	}
	return nil, fmt.Errorf("webhook certificate Secret %s: gave up after %d attempts: %w", key, maxAttempts, lastErr)
}

// ensureOnce is one read-check-write round of Ensure. retry reports whether
// err was a lost race after which Ensure should start over.
func ensureOnce(ctx context.Context, c client.Client, key client.ObjectKey, dnsNames []string, now time.Time) (b *Bundle, retry bool, err error) {
	var s corev1.Secret
	err = c.Get(ctx, key, &s)
	if apierrors.IsNotFound(err) {
		m, _, err := reconcileMaterial(nil, dnsNames, now)
		if err != nil {
			return nil, false, fmt.Errorf("webhook certificate Secret %s: %w", key, err)
		}
		s = corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name},
			Type:       corev1.SecretTypeOpaque,
			Data:       m.data(nil),
		}
		if err := c.Create(ctx, &s); err != nil {
			return nil, apierrors.IsAlreadyExists(err), fmt.Errorf("create webhook certificate Secret %s: %w", key, err)
		}
		return m.bundle(), false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("get webhook certificate Secret %s: %w", key, err)
	}

	m, changed, err := reconcileMaterial(s.Data, dnsNames, now)
	if err != nil {
		return nil, false, fmt.Errorf("webhook certificate Secret %s: %w", key, err)
	}
	if !changed {
		return m.bundle(), false, nil
	}
	s.Data = m.data(s.Data)
	if err := c.Update(ctx, &s); err != nil {
		retry := apierrors.IsConflict(err) || apierrors.IsNotFound(err)
		return nil, retry, fmt.Errorf("update webhook certificate Secret %s: %w", key, err)
	}
	return m.bundle(), false, nil
}

// material is the content of the Secret, parsed.
type material struct {
	caPEM, caKeyPEM     []byte
	certPEM, certKeyPEM []byte
	ca                  *x509.Certificate
	caKey               crypto.Signer
	cert                tls.Certificate // Leaf set
}

// data returns old's entries with the four keys set to m's PEM, in a new map.
func (m *material) data(old map[string][]byte) map[string][]byte {
	d := make(map[string][]byte, len(old)+4)
	for k, v := range old {
		d[k] = v
	}
	d[keyCACert] = m.caPEM
	d[keyCAKey] = m.caKeyPEM
	d[keyTLSCert] = m.certPEM
	d[keyTLSKey] = m.certKeyPEM
	return d
}

// bundle returns m as a Bundle.
func (m *material) bundle() *Bundle {
	return &Bundle{
		CA:       bytes.Clone(m.caPEM),
		Cert:     m.cert,
		NotAfter: m.cert.Leaf.NotAfter,
	}
}

// reconcileMaterial keeps what is usable in data (nil for none) and
// generates the rest. changed reports whether anything was generated.
func reconcileMaterial(data map[string][]byte, dnsNames []string, now time.Time) (m *material, changed bool, err error) {
	m = &material{}
	if ca, caKey, perr := pki.ParseCA(data[keyCACert], data[keyCAKey]); perr == nil && ca.NotAfter.Sub(now) >= renewBefore {
		m.caPEM, m.caKeyPEM, m.ca, m.caKey = data[keyCACert], data[keyCAKey], ca, caKey
	} else {
		// Missing, damaged or expiring within renewBefore: a new CA, and
		// so a new serving certificate below.
		if m.caPEM, m.caKeyPEM, m.ca, m.caKey, err = pki.NewCA(caCommonName, caValidityYears, now); err != nil {
			return nil, false, err
		}
		changed = true
	}

	if !changed {
		if cert, err := tls.X509KeyPair(data[keyTLSCert], data[keyTLSKey]); err == nil {
			if leaf, err := x509.ParseCertificate(cert.Certificate[0]); err == nil && servingUsable(leaf, m.ca, dnsNames, now) {
				cert.Leaf = leaf
				m.certPEM, m.certKeyPEM, m.cert = data[keyTLSCert], data[keyTLSKey], cert
				return m, false, nil
			}
		}
	}

	if m.certPEM, m.certKeyPEM, err = newServing(m.ca, m.caKey, dnsNames, now); err != nil {
		return nil, false, err
	}
	if m.cert, err = tls.X509KeyPair(m.certPEM, m.certKeyPEM); err != nil {
		return nil, false, fmt.Errorf("load generated serving certificate: %w", err)
	}
	if m.cert.Leaf, err = x509.ParseCertificate(m.cert.Certificate[0]); err != nil {
		return nil, false, fmt.Errorf("parse generated serving certificate: %w", err)
	}
	return m, true, nil
}

// servingUsable reports whether leaf can be kept: signed by ca, for exactly
// dnsNames, with at least renewBefore left.
func servingUsable(leaf, ca *x509.Certificate, dnsNames []string, now time.Time) bool {
	return leaf.CheckSignatureFrom(ca) == nil &&
		sameNames(leaf.DNSNames, dnsNames) &&
		leaf.NotAfter.Sub(now) >= renewBefore
}

// sameNames reports whether a and b hold the same names, in any order.
func sameNames(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

// newServing generates a serving certificate for dnsNames signed by ca,
// valid for servingValidityYears from now but not beyond ca.
func newServing(ca *x509.Certificate, caKey crypto.Signer, dnsNames []string, now time.Time) (certPEM, keyPEM []byte, err error) {
	priv, keyPEM, err := pki.NewKey()
	if err != nil {
		return nil, nil, fmt.Errorf("generate serving key: %w", err)
	}
	certPEM, err = pki.Sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: dnsNames[0]},
		DNSNames:    slices.Clone(dnsNames),
		NotBefore:   now.Add(-pki.Backdate),
		NotAfter:    now.AddDate(servingValidityYears, 0, 0),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, priv.Public(), ca, caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("serving certificate: %w", err)
	}
	return certPEM, keyPEM, nil
}

// PatchCABundle sets the caBundle of every webhook in the
// MutatingWebhookConfiguration name to ca, with a JSON merge patch
// (client.MergeFrom, with the resourceVersion as optimistic lock, because a
// merge patch replaces the whole webhooks list), and only when one differs.
// A patch that fails with Conflict re-reads the configuration and starts
// over, at most 5 times.
//
// It returns (false, nil) when the configuration does not exist (the webhook
// is not installed) and (true, nil) when it does (patched or already right).
func PatchCABundle(ctx context.Context, c client.Client, name string, ca []byte) (bool, error) {
	if len(ca) == 0 {
		return false, fmt.Errorf("MutatingWebhookConfiguration %s: empty caBundle given", name)
	}
	var lastErr error
	for range maxAttempts {
		var cfg admissionregistrationv1.MutatingWebhookConfiguration
		if err := c.Get(ctx, client.ObjectKey{Name: name}, &cfg); err != nil {
			if apierrors.IsNotFound(err) {
				return false, nil
			}
			return false, fmt.Errorf("get MutatingWebhookConfiguration %s: %w", name, err)
		}
		base := cfg.DeepCopy()
		changed := false
		for i := range cfg.Webhooks {
			if !bytes.Equal(cfg.Webhooks[i].ClientConfig.CABundle, ca) {
				cfg.Webhooks[i].ClientConfig.CABundle = bytes.Clone(ca)
				changed = true
			}
		}
		if !changed {
			return true, nil
		}
		err := c.Patch(ctx, &cfg, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{}))
		switch {
		case err == nil:
			return true, nil
		case apierrors.IsNotFound(err):
			return false, nil
		case apierrors.IsConflict(err):
			lastErr = fmt.Errorf("patch caBundle of MutatingWebhookConfiguration %s: %w", name, err)
		default:
			return false, fmt.Errorf("patch caBundle of MutatingWebhookConfiguration %s: %w", name, err)
		}
	}
	return false, fmt.Errorf("MutatingWebhookConfiguration %s: gave up after %d attempts: %w", name, maxAttempts, lastErr)
}

// Holder serves the current certificate to a tls.Config: use
// GetCertificate as tls.Config.GetCertificate and call Set whenever Ensure
// returns a new bundle. GetCertificate reads an atomic pointer, so Set and
// handshakes may run concurrently. The zero Holder is ready to use and holds
// nothing.
type Holder struct {
	b atomic.Pointer[Bundle]
}

// Set makes b the bundle served from now on. b must not be modified
// afterwards. Set(nil) clears the Holder.
func (h *Holder) Set(b *Bundle) {
	h.b.Store(b)
}

// GetCertificate returns the serving certificate of the bundle last Set. It
// fails when nothing has been set yet. Its signature is that of
// tls.Config.GetCertificate; the ClientHelloInfo is not used.
func (h *Holder) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	b := h.b.Load()
	if b == nil {
		return nil, errors.New("webhookcert: no serving certificate set yet")
	}
	return &b.Cert, nil
}
