// Package agentca issues the agents' and the manager's mutual-TLS
// certificates (package tlsid) on a cluster, with the manager as the signer
// of Kubernetes CertificateSigningRequests, as kube-controller-manager is for
// the kubelets' client certificates. It is used with the manager's
// --agent-tls=issue; the agents' side is package nodecert.
//
// # The CA
//
// The CA is kept in a Secret in the operator namespace (default
// tandem-agent-ca, type Opaque, keys ca.crt and ca.key, PEM; package pki
// makes it: ECDSA P-256, valid 10 years). EnsureCA creates it when the
// Secret is absent and otherwise only reads it: a Secret that exists but
// does not hold a usable CA is an error, never replaced, so that nothing
// (a GitOps sync, a second replica, a restart) changes the CA the agents
// trust behind their backs. The CA certificate is published in a ConfigMap
// of the same name (key ca.crt) that the agents read; EnsureCA keeps it
// equal to the Secret's.
//
// # What is signed
//
// The Signer controller (leader only) decides every CSR whose signerName is
// SignerName (tandem.dev/agent) and that has no Approved, Denied or Failed
// condition yet. It approves and signs one only when all of these hold
// (Check), and denies it with a message naming the first that fails:
//
//   - spec.username is the agents' ServiceAccount,
//     system:serviceaccount:<namespace>:<agent ServiceAccount>;
//   - the request names exactly one SAN, the URI spiffe://tandem.dev/node/<node>
//     (no DNS, IP or email SANs, no other URI);
//   - spec.extra["authentication.kubernetes.io/node-name"] is exactly
//     [<node>]: the API server puts there the node of the Pod a bound
//     ServiceAccount token was issued for (kube-apiserver 1.30+, feature
//     ServiceAccountTokenPodNodeInfo, beta and on by default in 1.30, GA in
//     1.32; the CSR registry copies the requester's extra into spec.extra
//     and a client cannot set it). So an agent Pod gets its own node's
//     identity and no other, although all agents share one ServiceAccount.
//     A token that is not pod-bound (a long-lived Secret token) carries no
//     node name and is denied;
//   - the key is ECDSA P-256 or P-384, or RSA of at least 2048 bits, and
//     the request's self-signature verifies;
//   - spec.usages is a subset of digital signature, key encipherment,
//     client auth and server auth.
//
// A CSR already approved (by a human with kubectl certificate approve, say)
// is signed only when the same checks pass; otherwise it gets a Failed
// condition. The certificate's lifetime is spec.expirationSeconds when set,
// never more than the signer's MaxLifetime (the manager's
// --agent-tls-max-lifetime, default 24h); it starts 5 minutes before the
// signing, for clock skew; its extended key usages are those requested
// (client auth, server auth), its key usage digital signature (plus key
// encipherment for RSA keys).
//
// The certificate also carries the node's name and its addresses as the
// Node object lists them (status.addresses: InternalIP and ExternalIP as IP
// SANs, the node name, Hostname, InternalDNS and ExternalDNS as DNS SANs),
// which the signer reads itself when it signs: the agent does not ask for
// them. Tandem's own peers check identities and ignore them (package
// tlsid), but NBD clients speaking TLS through GnuTLS (qemu, nbdcopy,
// nbdinfo with nbds://) check the server's certificate against the address
// they dialed. A node whose addresses change gets them at its next renewal
// (two thirds of the lifetime). A Node the signer cannot read (not created
// yet) gets a certificate with its name only.
//
// The manager's own certificate (spiffe://tandem.dev/manager) is not
// requested through the API: every manager replica signs one in process
// with the CA (ManagerCert) and renews it in memory at two thirds of its
// lifetime (package tlsid's FromPEM and Set). An administrator's client
// that may read the CA Secret (kubectl tandem verify, the e2e tests) signs
// itself a short-lived one the same way: ClientTLS.
package agentca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"time"

	"github.com/go-logr/logr"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/tandem-storage/tandem/internal/pki"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// SignerName is the signerName of the agents' CSRs.
const SignerName = "tandem.dev/agent"

// NodeNameExtra is the key of the requester's extra the API server sets to
// the node of the Pod a bound ServiceAccount token belongs to.
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// DefaultName is the default name of the CA's Secret and ConfigMap.
const DefaultName = "tandem-agent-ca"

// Keys of the Secret and the ConfigMap.
const (
	KeyCACert = "ca.crt"
	keyCAKey  = "ca.key"
)

const (
	caValidityYears = 10
	caCommonName    = "tandem-agent-ca"
	// leafBackdate is how long before signing a certificate starts.
	leafBackdate = 5 * time.Minute
	// DefaultMaxLifetime is the default cap of a certificate's lifetime.
	DefaultMaxLifetime = 24 * time.Hour
	// MinLifetime is the shortest cap allowed (the CSR API's minimum
	// expirationSeconds).
	MinLifetime = 10 * time.Minute
	maxAttempts = 5
)

// CA is the agents' CA.
type CA struct {
	// PEM is the CA certificate, as stored (the agents' ca.crt).
	PEM  []byte
	Cert *x509.Certificate
	Key  crypto.Signer
}

// EnsureCA returns the CA of the Secret name in namespace, creating the
// Secret when absent, and makes the ConfigMap name hold its certificate
// (see the package documentation). c should read from the API server, not a
// cache. Races with other replicas are settled by the API server: a lost
// Create re-reads.
func EnsureCA(ctx context.Context, c client.Client, namespace, name string, now time.Time) (*CA, error) {
	key := client.ObjectKey{Namespace: namespace, Name: name}
	var ca *CA
	var lastErr error
	for range maxAttempts {
		var s corev1.Secret
		err := c.Get(ctx, key, &s)
		if apierrors.IsNotFound(err) {
			certPEM, keyPEM, cert, priv, err := pki.NewCA(caCommonName, caValidityYears, now)
			if err != nil {
				return nil, fmt.Errorf("agent CA Secret %s: %w", key, err)
			}
			s = corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
				Type:       corev1.SecretTypeOpaque,
				Data:       map[string][]byte{KeyCACert: certPEM, keyCAKey: keyPEM},
			}
			if err := c.Create(ctx, &s); err != nil {
				if apierrors.IsAlreadyExists(err) {
					lastErr = err
					continue
				}
				return nil, fmt.Errorf("create agent CA Secret %s: %w", key, err)
			}
			ca = &CA{PEM: certPEM, Cert: cert, Key: priv}
			break
		}
		if err != nil {
			return nil, fmt.Errorf("get agent CA Secret %s: %w", key, err)
		}
		if ca, err = CAFromSecret(&s); err != nil {
			return nil, fmt.Errorf("%w; it is never replaced automatically: fix or delete it", err)
		}
		break
	}
	if ca == nil {
		return nil, fmt.Errorf("agent CA Secret %s: gave up after %d attempts: %w", key, maxAttempts, lastErr)
	}
	if err := publish(ctx, c, key, ca.PEM); err != nil {
		return nil, err
	}
	return ca, nil
}

// publish makes the ConfigMap key hold caPEM under KeyCACert.
func publish(ctx context.Context, c client.Client, key client.ObjectKey, caPEM []byte) error {
	var lastErr error
	for range maxAttempts {
		var cm corev1.ConfigMap
		err := c.Get(ctx, key, &cm)
		if apierrors.IsNotFound(err) {
			cm = corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name},
				Data:       map[string]string{KeyCACert: string(caPEM)},
			}
			if err := c.Create(ctx, &cm); err != nil {
				if apierrors.IsAlreadyExists(err) {
					lastErr = err
					continue
				}
				return fmt.Errorf("create agent CA ConfigMap %s: %w", key, err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("get agent CA ConfigMap %s: %w", key, err)
		}
		if cm.Data[KeyCACert] == string(caPEM) {
			return nil
		}
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[KeyCACert] = string(caPEM)
		if err := c.Update(ctx, &cm); err != nil {
			if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
				lastErr = err
				continue
			}
			return fmt.Errorf("update agent CA ConfigMap %s: %w", key, err)
		}
		return nil
	}
	return fmt.Errorf("agent CA ConfigMap %s: gave up after %d attempts: %w", key, maxAttempts, lastErr)
}

// Policy is what Check requires of a CSR.
type Policy struct {
	// Username is the agents' ServiceAccount's user name,
	// system:serviceaccount:<namespace>:<name>.
	Username string
	// MaxLifetime caps a certificate's lifetime.
	MaxLifetime time.Duration
}

// allowedUsages are the usages an agent may ask for.
var allowedUsages = []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageKeyEncipherment, certv1.UsageClientAuth, certv1.UsageServerAuth}

// Check decides a CSR of SignerName: nil when it may be signed (then it
// returns the parsed request and the node it is for), else an error whose
// message says why not, for the Denied condition.
func (p Policy) Check(csr *certv1.CertificateSigningRequest) (*x509.CertificateRequest, string, error) {
	if csr.Spec.Username != p.Username {
		return nil, "", fmt.Errorf("the requester is %q, not the agents' ServiceAccount %q", csr.Spec.Username, p.Username)
	}
	block, _ := pem.Decode(csr.Spec.Request)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, "", errors.New("spec.request holds no PEM CERTIFICATE REQUEST")
	}
	req, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, "", fmt.Errorf("spec.request: %w", err)
	}
	if err := req.CheckSignature(); err != nil {
		return nil, "", fmt.Errorf("spec.request: the request's signature does not verify: %w", err)
	}
	if n := len(req.DNSNames) + len(req.IPAddresses) + len(req.EmailAddresses); n > 0 {
		return nil, "", fmt.Errorf("the request names %d DNS, IP or email SANs; want only the URI SAN %s<node>", n, tlsid.NodeIdentity(""))
	}
	if len(req.URIs) != 1 {
		return nil, "", fmt.Errorf("the request names %d URI SANs; want exactly one, %s<node>", len(req.URIs), tlsid.NodeIdentity(""))
	}
	u := req.URIs[0]
	id := tlsid.Identity(uriString(u))
	node, ok := id.Node()
	if !ok || id.Valid() != nil || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, "", fmt.Errorf("the request's URI SAN %q is not %s<node> with a valid node name", u.String(), tlsid.NodeIdentity(""))
	}
	extra := csr.Spec.Extra[NodeNameExtra]
	switch {
	case len(extra) == 0:
		return nil, "", fmt.Errorf("the request was not made with a Pod-bound ServiceAccount token naming a node (no %s in spec.extra; kube-apiserver 1.30+ sets it), so the requester's node is unknown", NodeNameExtra)
	case len(extra) != 1:
		return nil, "", fmt.Errorf("spec.extra[%s] holds %d values; want one", NodeNameExtra, len(extra))
	case extra[0] != node:
		return nil, "", fmt.Errorf("the requesting Pod runs on %s but the CSR asks for %s", extra[0], node)
	}
	if err := keyOK(req.PublicKey); err != nil {
		return nil, "", err
	}
	if len(csr.Spec.Usages) == 0 {
		return nil, "", errors.New("spec.usages is empty")
	}
	for _, us := range csr.Spec.Usages {
		if !slices.Contains(allowedUsages, us) {
			return nil, "", fmt.Errorf("usage %q is not allowed; want a subset of %v", us, allowedUsages)
		}
	}
	return req, node, nil
}

func uriString(u *url.URL) string { return u.Scheme + "://" + u.Host + u.Path }

// keyOK accepts ECDSA P-256 and P-384 keys and RSA keys of 2048 bits or more.
func keyOK(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		return fmt.Errorf("the key is ECDSA on %s; want P-256 or P-384", k.Curve.Params().Name)
	case *rsa.PublicKey:
		if k.N.BitLen() >= 2048 {
			return nil
		}
		return fmt.Errorf("the key is RSA of %d bits; want at least 2048", k.N.BitLen())
	default:
		return fmt.Errorf("the key is %T; want ECDSA P-256/P-384 or RSA of at least 2048 bits", pub)
	}
}

// Lifetime is how long a certificate for csr is valid.
func (p Policy) Lifetime(csr *certv1.CertificateSigningRequest) time.Duration {
	d := p.MaxLifetime
	if d <= 0 {
		d = DefaultMaxLifetime
	}
	if e := csr.Spec.ExpirationSeconds; e != nil && *e > 0 && time.Duration(*e)*time.Second < d {
		d = time.Duration(*e) * time.Second
	}
	return d
}

// NodeAddresses are the DNS names and IP addresses a node's certificate
// carries besides its identity.
type NodeAddresses struct {
	DNSNames []string
	IPs      []net.IP
}

// AddressesOf returns the names and addresses of node n: its name, then
// status.addresses in order (duplicates and unparsable IPs left out).
func AddressesOf(n *corev1.Node) NodeAddresses {
	a := NodeAddresses{DNSNames: []string{n.Name}}
	for _, ad := range n.Status.Addresses {
		switch ad.Type {
		case corev1.NodeInternalIP, corev1.NodeExternalIP:
			ip := net.ParseIP(ad.Address)
			if ip != nil && !slices.ContainsFunc(a.IPs, ip.Equal) {
				a.IPs = append(a.IPs, ip)
			}
		case corev1.NodeHostName, corev1.NodeInternalDNS, corev1.NodeExternalDNS:
			if ad.Address != "" && !slices.Contains(a.DNSNames, ad.Address) {
				a.DNSNames = append(a.DNSNames, ad.Address)
			}
		}
	}
	return a
}

// SignCSR signs the checked request req for node with ca, valid for
// lifetime from now, naming addrs as well, and returns the certificate's
// PEM.
func (ca *CA) SignCSR(req *x509.CertificateRequest, node string, addrs NodeAddresses, usages []certv1.KeyUsage, lifetime time.Duration, now time.Time) ([]byte, error) {
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "tandem-agent:" + node},
		URIs:        req.URIs,
		DNSNames:    addrs.DNSNames,
		IPAddresses: addrs.IPs,
		NotBefore:   now.Add(-leafBackdate),
		NotAfter:    now.Add(lifetime),
	}
	for _, us := range usages {
		switch us {
		case certv1.UsageDigitalSignature:
			tmpl.KeyUsage |= x509.KeyUsageDigitalSignature
		case certv1.UsageKeyEncipherment:
			tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
		case certv1.UsageClientAuth:
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
		case certv1.UsageServerAuth:
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
	}
	if tmpl.KeyUsage == 0 {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	}
	return pki.Sign(tmpl, req.PublicKey, ca.Cert, ca.Key)
}

// ManagerCert signs a new key for the manager's identity, valid for
// lifetime from now, and returns the certificate's and key's PEM.
func (ca *CA) ManagerCert(lifetime time.Duration, now time.Time) (certPEM, keyPEM []byte, err error) {
	priv, keyPEM, err := pki.NewKey()
	if err != nil {
		return nil, nil, fmt.Errorf("generate the manager's key: %w", err)
	}
	u, err := url.Parse(string(tlsid.Manager))
	if err != nil {
		return nil, nil, err
	}
	certPEM, err = pki.Sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "tandem-manager"},
		URIs:        []*url.URL{u},
		NotBefore:   now.Add(-leafBackdate),
		NotAfter:    now.Add(lifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, priv.Public(), ca.Cert, ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("the manager's certificate: %w", err)
	}
	return certPEM, keyPEM, nil
}

// ManagerSource returns an in-memory tlsid.Source holding a new manager
// certificate of lifetime, and Renew, which keeps it current: it signs a
// new one at two thirds of the current one's lifetime (a failure is logged
// and retried a minute later) until ctx is done.
func (ca *CA) ManagerSource(lifetime time.Duration, clk clock.WithTicker) (*tlsid.Source, func(ctx context.Context, log logr.Logger), error) {
	certPEM, keyPEM, err := ca.ManagerCert(lifetime, clk.Now())
	if err != nil {
		return nil, nil, err
	}
	src, err := tlsid.FromPEM(certPEM, keyPEM, ca.PEM, tlsid.WithIdentity(tlsid.Manager))
	if err != nil {
		return nil, nil, err
	}
	renew := func(ctx context.Context, log logr.Logger) {
		for {
			nb, na := src.NotBefore(), src.NotAfter()
			due := nb.Add(na.Sub(nb) * 2 / 3)
			t := clk.NewTimer(due.Sub(clk.Now()))
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C():
			}
			certPEM, keyPEM, err := ca.ManagerCert(lifetime, clk.Now())
			if err == nil {
				err = src.Set(certPEM, keyPEM, ca.PEM)
			}
			if err != nil {
				log.Error(err, "Cannot renew the manager's agent TLS certificate; retrying in a minute", "notAfter", na)
				t := clk.NewTimer(time.Minute)
				select {
				case <-ctx.Done():
					t.Stop()
					return
				case <-t.C():
				}
				continue
			}
			log.Info("Renewed the manager's agent TLS certificate", "serial", src.Serial(), "notAfter", src.NotAfter())
		}
	}
	return src, renew, nil
}

// ServiceAccountUser is the user name the API server gives a
// ServiceAccount's tokens.
func ServiceAccountUser(namespace, name string) string {
	return "system:serviceaccount:" + namespace + ":" + name
}

// CAFromSecret returns the CA a Secret of EnsureCA holds (keys ca.crt and
// ca.key), or an error saying it holds none.
func CAFromSecret(s *corev1.Secret) (*CA, error) {
	cert, priv, err := pki.ParseCA(s.Data[KeyCACert], s.Data[keyCAKey])
	if err != nil {
		return nil, fmt.Errorf("agent CA Secret %s/%s holds no usable CA (%s and %s): %w", s.Namespace, s.Name, KeyCACert, keyCAKey, err)
	}
	return &CA{PEM: s.Data[KeyCACert], Cert: cert, Key: priv}, nil
}

// ReadCA reads the CA of the Secret name in namespace; unlike EnsureCA it
// never creates it. A failed read is returned wrapped, so that
// apierrors.IsForbidden and IsNotFound still tell it.
func ReadCA(ctx context.Context, r client.Reader, namespace, name string) (*CA, error) {
	var s corev1.Secret
	if err := r.Get(ctx, client.ObjectKey{Namespace: namespace, Name: name}, &s); err != nil {
		return nil, fmt.Errorf("get agent CA Secret %s/%s: %w", namespace, name, err)
	}
	return CAFromSecret(&s)
}

// ManagerClientTLS is a TLS client config presenting a new manager
// certificate of lifetime (ManagerCert) and verifying the agents'
// certificates against the CA: what an administrator's client (kubectl
// tandem verify, the e2e tests) uses to call agents as the manager does.
func (ca *CA) ManagerClientTLS(lifetime time.Duration, now time.Time) (*tls.Config, error) {
	certPEM, keyPEM, err := ca.ManagerCert(lifetime, now)
	if err != nil {
		return nil, err
	}
	src, err := tlsid.FromPEM(certPEM, keyPEM, ca.PEM, tlsid.WithIdentity(tlsid.Manager))
	if err != nil {
		return nil, fmt.Errorf("the manager's certificate: %w", err)
	}
	return src.ClientConfig(nil), nil
}

// ClientTLS reads the CA of the Secret name in namespace (ReadCA) and
// returns its ManagerClientTLS, of lifetime from now. Reading the Secret
// needs get on secrets/<name> in namespace.
func ClientTLS(ctx context.Context, r client.Reader, namespace, name string, lifetime time.Duration) (*tls.Config, error) {
	ca, err := ReadCA(ctx, r, namespace, name)
	if err != nil {
		return nil, err
	}
	return ca.ManagerClientTLS(lifetime, time.Now())
}
