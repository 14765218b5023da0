// Package tlsidtest makes the TLS material of package tlsid in memory for
// tests: CAs, certificates naming a node or the manager, and directories
// laid out as tlsid.Load reads them. Keys are ECDSA P-256.
package tlsidtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/internal/tlsid"
)

var serial atomic.Int64

// CA is a certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// PEM is the CA certificate, as ca.crt holds it.
	PEM []byte
}

// NewCA makes a CA named name.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial.Add(1)),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{Cert: c, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// Issue returns a certificate naming id (no URI SAN when id is empty) and
// its key, PEM-encoded, valid for a day with the usages serverAuth and
// clientAuth. edit, if any, changes the template before it is signed.
func (ca *CA) Issue(t testing.TB, id tlsid.Identity, edit ...func(*x509.Certificate)) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)),
		Subject:      pkix.Name{CommonName: string(id)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if id != "" {
		u, err := url.Parse(string(id))
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	for _, e := range edit {
		e(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

// WriteDir writes a certificate for id issued by ca, its key, and a CA
// bundle of trusted (ca itself when none is given) into dir, replacing
// each file atomically (as the kubelet's swap of a Secret volume does).
func (ca *CA) WriteDir(t testing.TB, dir string, id tlsid.Identity, trusted ...*CA) {
	t.Helper()
	if len(trusted) == 0 {
		trusted = []*CA{ca}
	}
	c, k := ca.Issue(t, id)
	WriteFiles(t, dir, c, k, Bundle(trusted...))
}

// Dir returns a new directory holding a certificate for id issued by ca
// and a bundle of trusted (ca itself when none is given).
func (ca *CA) Dir(t testing.TB, id tlsid.Identity, trusted ...*CA) string {
	t.Helper()
	dir := t.TempDir()
	ca.WriteDir(t, dir, id, trusted...)
	return dir
}

// Bundle is the CA bundle of cas.
func Bundle(cas ...*CA) []byte {
	var b []byte
	for _, c := range cas {
		b = append(b, c.PEM...)
	}
	return b
}

// Load is tlsid.Load of dir, failing the test on an error.
func Load(t testing.TB, dir string, opts ...tlsid.Option) *tlsid.Source {
	t.Helper()
	s, err := tlsid.Load(dir, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// WriteFiles writes tls.crt, tls.key and ca.crt into dir, each replaced
// atomically.
func WriteFiles(t testing.TB, dir string, cert, key, ca []byte) {
	t.Helper()
	for name, b := range map[string][]byte{tlsid.CertFile: cert, tlsid.KeyFile: key, tlsid.CAFile: ca} {
		tmp := filepath.Join(dir, "."+name+".tmp")
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
}
