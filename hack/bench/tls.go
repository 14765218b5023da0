package main

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/tandem-storage/tandem/internal/pki"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// benchTLS is the mutual TLS material of the TLS targets (async-tls,
// sync-tls): a CA of the bench's own, made at start, per-node
// directories laid out as an agent's --tls-dir reads them (tls.crt,
// tls.key, ca.crt), and the control client's configuration holding a
// manager certificate (the bench plays the manager).
type benchTLS struct {
	dir    string // one subdirectory per node
	ca     *x509.Certificate
	caKey  crypto.Signer
	caPEM  []byte
	client *tls.Config // the manager's, for the agents' control API
}

// newBenchTLS makes a CA and the manager's client certificate; node
// directories go under dir.
func newBenchTLS(dir string) (*benchTLS, error) {
	caPEM, _, ca, caKey, err := pki.NewCA("tandem bench CA", 1, time.Now())
	if err != nil {
		return nil, fmt.Errorf("bench CA: %w", err)
	}
	t := &benchTLS{dir: dir, ca: ca, caKey: caKey, caPEM: caPEM}
	cert, key, err := t.issue(tlsid.Manager, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, err
	}
	src, err := tlsid.FromPEM(cert, key, caPEM, tlsid.WithIdentity(tlsid.Manager))
	if err != nil {
		return nil, fmt.Errorf("manager certificate: %w", err)
	}
	t.client = src.ClientConfig(nil)
	return t, nil
}

// issue signs a certificate naming id (its URI SAN) with the usages.
func (t *benchTLS) issue(id tlsid.Identity, usages ...x509.ExtKeyUsage) (certPEM, keyPEM []byte, err error) {
	uri, err := url.Parse(string(id))
	if err != nil {
		return nil, nil, fmt.Errorf("identity %s: %w", id, err)
	}
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		return nil, nil, fmt.Errorf("key of %s: %w", id, err)
	}
	now := time.Now()
	certPEM, err = pki.Sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: string(id)},
		URIs:        []*url.URL{uri},
		NotBefore:   now.Add(-pki.Backdate),
		NotAfter:    now.Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: usages,
	}, key.Public(), t.ca, t.caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("certificate of %s: %w", id, err)
	}
	return certPEM, keyPEM, nil
}

// nodeDir writes a certificate naming node (serverAuth and clientAuth),
// its key and the CA into a directory of its own and returns it.
func (t *benchTLS) nodeDir(node string) (string, error) {
	cert, key, err := t.issue(tlsid.NodeIdentity(node), x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(t.dir, node)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	for name, b := range map[string][]byte{tlsid.CertFile: cert, tlsid.KeyFile: key, tlsid.CAFile: t.caPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return "", fmt.Errorf("write %s of node %s: %w", name, node, err)
		}
	}
	return dir, nil
}
