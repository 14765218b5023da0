// Package pki holds the certificate primitives Tandem's self-managed CAs are
// built from (package webhookcert's webhook CA, package agentca's agent CA):
// generating keys and serial numbers, making a self-signed CA, parsing a
// stored CA, and signing a leaf certificate with it. Everything is the
// standard library (crypto/x509, crypto/ecdsa, crypto/rand, encoding/pem).
//
// Keys generated here are ECDSA P-256, PEM-encoded as "EC PRIVATE KEY"
// (SEC 1); certificates as "CERTIFICATE". Certificates start Backdate
// before the time given, so that peers whose clocks lag a little accept
// them at once.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// Backdate is how long before the time given certificates become valid,
// for clock skew.
const Backdate = time.Hour

// serialLimit is 2^128: serial numbers are random 128-bit numbers.
var serialLimit = new(big.Int).Lsh(big.NewInt(1), 128)

// NewKey generates an ECDSA P-256 key and its PEM.
func NewKey() (*ecdsa.PrivateKey, []byte, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		return nil, nil, err
	}
	return priv, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

// NewSerial returns a random serial number in [1, 2^128).
func NewSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Sub(serialLimit, big.NewInt(1)))
	if err != nil {
		return nil, err
	}
	return n.Add(n, big.NewInt(1)), nil
}

// NewCA generates a self-signed CA named commonName, valid from now minus
// Backdate for years years, that signs leaf certificates only (path length
// zero).
func NewCA(commonName string, years int, now time.Time) (certPEM, keyPEM []byte, ca *x509.Certificate, key crypto.Signer, err error) {
	priv, keyPEM, err := NewKey()
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := NewSerial()
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("generate CA serial number: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.AddDate(years, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("create CA certificate: %w", err)
	}
	if ca, err = x509.ParseCertificate(der); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("parse generated CA certificate: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, ca, priv, nil
}

// ParseCA parses a stored CA certificate and key, checking that they match
// and that the certificate is a CA.
func ParseCA(certPEM, keyPEM []byte) (*x509.Certificate, crypto.Signer, error) {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, nil, err
	}
	ca, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	if !ca.IsCA || !ca.BasicConstraintsValid {
		return nil, nil, errors.New("stored CA certificate is not a CA")
	}
	key, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("stored CA key of type %T cannot sign", pair.PrivateKey)
	}
	return ca, key, nil
}

// Sign signs tmpl (its SerialNumber is set here when nil) for pub with ca,
// never beyond ca's expiry, and returns the certificate's PEM.
func Sign(tmpl *x509.Certificate, pub crypto.PublicKey, ca *x509.Certificate, caKey crypto.Signer) ([]byte, error) {
	if tmpl.SerialNumber == nil {
		serial, err := NewSerial()
		if err != nil {
			return nil, fmt.Errorf("generate serial number: %w", err)
		}
		tmpl.SerialNumber = serial
	}
	if tmpl.NotAfter.After(ca.NotAfter) {
		tmpl.NotAfter = ca.NotAfter
	}
	tmpl.BasicConstraintsValid = true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, pub, caKey)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}
