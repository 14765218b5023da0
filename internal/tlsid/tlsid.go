// Package tlsid owns Tandem's mutual TLS: the certificates of the agents
// and the manager, how they are loaded and reloaded while a process runs,
// and the identities they carry.
//
// # Files
//
// A process is given one directory (--tls-dir), laid out as a Secret of type
// kubernetes.io/tls mounted as a volume (cert-manager writes the same keys):
//
//	tls.crt  the process's certificate (PEM), optionally followed by its intermediates
//	tls.key  its private key (PEM; any type crypto/tls parses)
//	ca.crt   the CA bundle (PEM, one or more certificates) peers are verified against
//
// # Identities
//
// A certificate names whom it belongs to in exactly one URI SAN of the trust
// domain tandem.dev (SPIFFE IDs):
//
//	spiffe://tandem.dev/node/<node>   the agent of Kubernetes node <node>
//	spiffe://tandem.dev/manager       the manager (the controller)
//
// DNS and IP SANs are ignored: peers dial addresses, and a node's identity is
// its node name, not its address. Node certificates need the extended key
// usages serverAuth and clientAuth (an agent listens and dials); the
// manager's needs clientAuth. A certificate without an EKU extension is
// accepted for both, as crypto/x509 does.
//
// Verification is against ca.crt only: the system roots are never trusted.
// The peer's chain must lead to one of the bundle's certificates and the
// leaf must carry a valid Tandem identity, or the handshake fails.
// PeerIdentity then says who the peer is; what it may do is the caller's
// rule (package dataplane/agent: a primary's Hello must name the node of its
// certificate, and only the manager may change anything on the control API).
//
// # Rotation without a restart
//
// Source.Watch reads the three files again every ReloadEvery; a change is
// used by every handshake from then on (the configs take the certificate
// and the CA pool from the Source at each handshake), and connections
// already open keep the session they have. Material that does not load (a
// file missing or half-written, a key that does not match its certificate,
// a certificate that names another identity than the process's own) is
// refused with a logged error and the material loaded before stays in use.
//
// To rotate a CA, first give everyone a ca.crt holding both the old and the
// new CA (every peer accepts both), then issue certificates from the new CA,
// then drop the old one from the bundle. Renewing a certificate from the
// same CA (what cert-manager does before expiry) needs no step: the files
// change, the next handshake presents the new certificate.
//
// # In memory
//
// A process that makes its own certificate (the manager with
// --agent-tls=issue, package agentca) uses FromPEM and Set instead of a
// directory: the same configs, identity checks and rules, with the material
// given as bytes. Such a Source has no files: Reload and Watch do nothing.
package tlsid

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/utils/clock"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// The files of a TLS directory.
const (
	CertFile = "tls.crt"
	KeyFile  = "tls.key"
	CAFile   = "ca.crt"
)

// ReloadEvery is how often Watch reads the files again.
const ReloadEvery = 5 * time.Second

// TrustDomain is the SPIFFE trust domain of Tandem's identities.
const TrustDomain = "tandem.dev"

// Identity is a SPIFFE ID of the trust domain: NodeIdentity(node) or
// Manager.
type Identity string

// Manager is the manager's identity.
const Manager Identity = "spiffe://" + TrustDomain + "/manager"

const nodePrefix = "spiffe://" + TrustDomain + "/node/"

// NodeIdentity is the identity of node's agent.
func NodeIdentity(node string) Identity { return Identity(nodePrefix + node) }

// Node returns the node an agent's identity names, and whether it is one.
func (id Identity) Node() (string, bool) {
	n, ok := strings.CutPrefix(string(id), nodePrefix)
	if !ok || n == "" {
		return "", false
	}
	return n, true
}

// Valid reports whether id is Manager or the identity of a node whose name
// is a valid Kubernetes node name (lowercase RFC 1123 subdomain).
func (id Identity) Valid() error {
	if id == Manager {
		return nil
	}
	n, ok := id.Node()
	if !ok {
		return fmt.Errorf("identity %q is neither %s nor %s<node>", id, Manager, nodePrefix)
	}
	if len(n) > 253 || !validNode(n) {
		return fmt.Errorf("identity %q: %q is not a valid node name", id, n)
	}
	return nil
}

func validNode(n string) bool {
	for i, c := range n {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case (c == '-' || c == '.') && i > 0 && i < len(n)-1:
		default:
			return false
		}
	}
	return n != ""
}

// CertIdentity returns the identity a certificate names: its one URI SAN
// of the trust domain, which must be valid. Other URIs are ignored.
func CertIdentity(c *x509.Certificate) (Identity, error) {
	var found []Identity
	for _, u := range c.URIs {
		if u.Scheme == "spiffe" && u.Host == TrustDomain {
			found = append(found, Identity(uriString(u)))
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("certificate %q names no identity (no URI SAN spiffe://%s/...)", c.Subject.String(), TrustDomain)
	case 1:
		if err := found[0].Valid(); err != nil {
			return "", fmt.Errorf("certificate %q: %w", c.Subject.String(), err)
		}
		return found[0], nil
	default:
		return "", fmt.Errorf("certificate %q names %d identities; want one", c.Subject.String(), len(found))
	}
}

func uriString(u *url.URL) string {
	// Not u.String(): a path is compared as it was written, unescaped.
	return u.Scheme + "://" + u.Host + u.Path
}

// PeerIdentity returns the identity of the peer of a connection whose
// certificate was verified in its handshake (a config of this package on
// the server side, where cs.VerifiedChains is set). A connection without a
// verified peer certificate has none: an error.
func PeerIdentity(cs tls.ConnectionState) (Identity, error) {
	if !cs.HandshakeComplete {
		return "", errors.New("TLS handshake not complete")
	}
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", errors.New("the peer presented no verified certificate")
	}
	return CertIdentity(cs.VerifiedChains[0][0])
}

// material is one consistent load of the files.
type material struct {
	cert *tls.Certificate
	leaf *x509.Certificate
	id   Identity
	pool *x509.CertPool
	raw  [3][]byte
}

// Source is the current TLS material of a directory.
type Source struct {
	dir  string
	want Identity
	clk  clock.WithTicker
	cur  atomic.Pointer[material]
	mu   sync.Mutex // serializes Reload
}

// Option configures Load.
type Option func(*Source)

// WithIdentity requires the certificate to name id (a process loading the
// certificate of another node or of the manager refuses to start, and a
// reload that would change identity is refused).
func WithIdentity(id Identity) Option { return func(s *Source) { s.want = id } }

// WithClock sets the clock Watch ticks on (default: the real one).
func WithClock(c clock.WithTicker) Option { return func(s *Source) { s.clk = c } }

// Load reads the TLS directory dir (CertFile, KeyFile, CAFile).
func Load(dir string, opts ...Option) (*Source, error) {
	s := &Source{dir: dir, clk: clock.RealClock{}}
	for _, o := range opts {
		o(s)
	}
	if _, err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// FromPEM returns an in-memory Source holding the certificate (its chain
// may follow), key and CA bundle given as PEM; Set replaces them.
func FromPEM(certPEM, keyPEM, caPEM []byte, opts ...Option) (*Source, error) {
	s := &Source{clk: clock.RealClock{}}
	for _, o := range opts {
		o(s)
	}
	if err := s.Set(certPEM, keyPEM, caPEM); err != nil {
		return nil, err
	}
	return s, nil
}

// Set replaces the material with the PEM given, checked as Reload checks
// files; on an error the material before stays in use. For a Source of
// FromPEM (a Source of a directory takes its material from the files).
func (s *Source) Set(certPEM, keyPEM, caPEM []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store([3][]byte{certPEM, keyPEM, caPEM}, "in memory")
}

// NotBefore is when the current certificate starts to be valid.
func (s *Source) NotBefore() time.Time { return s.cur.Load().leaf.NotBefore }

// Serial is the current certificate's serial number, in hex.
func (s *Source) Serial() string { return s.cur.Load().leaf.SerialNumber.Text(16) }

// Dir is the directory the Source reads.
func (s *Source) Dir() string { return s.dir }

// Identity is the identity the current certificate names.
func (s *Source) Identity() Identity { return s.cur.Load().id }

// NotAfter is when the current certificate expires.
func (s *Source) NotAfter() time.Time { return s.cur.Load().leaf.NotAfter }

// Reload reads the files again. It reports whether they changed; on an
// error the material loaded before stays in use.
func (s *Source) Reload() (bool, error) {
	if s.dir == "" {
		return false, nil // in memory: nothing to read
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var raw [3][]byte
	for i, f := range []string{CertFile, KeyFile, CAFile} {
		b, err := os.ReadFile(filepath.Join(s.dir, f))
		if err != nil {
			return false, fmt.Errorf("tls: read %w", err)
		}
		raw[i] = b
	}
	if old := s.cur.Load(); old != nil && bytes.Equal(old.raw[0], raw[0]) && bytes.Equal(old.raw[1], raw[1]) && bytes.Equal(old.raw[2], raw[2]) {
		return false, nil
	}
	if err := s.store(raw, s.dir); err != nil {
		return false, err
	}
	return true, nil
}

// store parses raw and makes it current; where names the material in
// errors. s.mu must be held.
func (s *Source) store(raw [3][]byte, where string) error {
	m, err := parse(raw)
	if err != nil {
		return fmt.Errorf("tls: %s: %w", where, err)
	}
	if s.want != "" && m.id != s.want {
		return fmt.Errorf("tls: %s: the certificate names %s, want %s", where, m.id, s.want)
	}
	if old := s.cur.Load(); old != nil && old.id != m.id {
		return fmt.Errorf("tls: %s: the certificate names %s, was %s: a reload never changes identity", where, m.id, old.id)
	}
	s.cur.Store(m)
	return nil
}

func parse(raw [3][]byte) (*material, error) {
	cert, err := tls.X509KeyPair(raw[0], raw[1])
	if err != nil {
		return nil, fmt.Errorf("%s and %s: %w", CertFile, KeyFile, err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("%s: %w", CertFile, err)
		}
	}
	id, err := CertIdentity(leaf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CertFile, err)
	}
	pool := x509.NewCertPool()
	n := 0
	for rest := raw[2]; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", CAFile, n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("%s holds no certificate", CAFile)
	}
	return &material{cert: &cert, leaf: leaf, id: id, pool: pool, raw: raw}, nil
}

// Watch reloads the files every interval until ctx is done, logging each
// change and each failure once. A nil Source, or one in memory, does
// nothing.
func (s *Source) Watch(ctx context.Context, interval time.Duration, log logr.Logger) {
	if s == nil || s.dir == "" {
		return
	}
	fsutil.PollReload(ctx, s.clk, interval, s.Reload,
		func(err error) {
			log.Error(err, "Cannot reload the TLS files; keeping the certificates loaded before", "dir", s.dir)
		},
		func() {
			log.Info("TLS files reloaded", "dir", s.dir, "identity", s.Identity(), "notAfter", s.NotAfter())
		})
}

// verify checks a peer's chain against the current CA bundle for usage,
// and returns the identity its leaf names.
func (s *Source) verify(certs []*x509.Certificate, usage x509.ExtKeyUsage) (Identity, error) {
	if len(certs) == 0 {
		return "", errors.New("the peer presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: s.cur.Load().pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return "", fmt.Errorf("peer certificate: %w", err)
	}
	return CertIdentity(certs[0])
}

// ServerConfig is the config of a listener: it presents the current
// certificate and verifies a client's against the current CA bundle
// (clientAuthUsage), requiring the client's certificate to name a valid
// identity. With requireClient a client without a certificate fails the
// handshake; without it, it is let through with no identity
// (PeerIdentity fails), for listeners that also serve anonymous probes.
func (s *Source) ServerConfig(requireClient bool) *tls.Config {
	auth := tls.VerifyClientCertIfGiven
	if requireClient {
		auth = tls.RequireAndVerifyClientCert
	}
	base := &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return s.cur.Load().cert, nil
		},
	}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		m := s.cur.Load()
		return &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{*m.cert},
			ClientAuth:   auth,
			ClientCAs:    m.pool,
			// A resumed session would skip verifying the client's
			// chain against the CA bundle loaded since.
			SessionTicketsDisabled: true,
			VerifyConnection: func(cs tls.ConnectionState) error {
				if len(cs.VerifiedChains) == 0 {
					return nil // no certificate, and none required
				}
				_, err := CertIdentity(cs.VerifiedChains[0][0])
				return err
			},
		}, nil
	}
	return base
}

// ClientConfig is the config of a dialer: it presents the current
// certificate and verifies the server's against the current CA bundle
// (serverAuth) and with check, which is given the identity the server's
// certificate names (nil: any valid identity). The server's DNS names and
// addresses are not checked: identities are.
func (s *Source) ClientConfig(check func(Identity) error) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return s.cur.Load().cert, nil
		},
		// The standard verification checks a host name; VerifyConnection
		// does the rest of it (chain, usage), and the identity.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := s.verify(cs.PeerCertificates, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			if check != nil {
				return check(id)
			}
			return nil
		},
	}
}
