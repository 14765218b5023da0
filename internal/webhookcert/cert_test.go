package webhookcert

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
)

var (
	// t0 is the fixed clock of the tests.
	t0 = time.Date(2026, time.March, 1, 12, 0, 0, 0, time.UTC)

	secretKey = client.ObjectKey{Namespace: "tandem-system", Name: "tandem-webhook-cert"}

	names = []string{
		"tandem-webhook.tandem-system.svc",
		"tandem-webhook.tandem-system.svc.cluster.local",
	}

	secretsGR = schema.GroupResource{Resource: "secrets"}
)

func days(n int) time.Duration { return time.Duration(n) * 24 * time.Hour }

// newClient returns a fake client over objs, with funcs intercepting it.
func newClient(funcs interceptor.Funcs, objs ...client.Object) client.WithWatch {
	return fake.NewClientBuilder().
		WithScheme(scheme.Scheme).
		WithObjects(objs...).
		WithInterceptorFuncs(funcs).
		Build()
}

func getSecret(t *testing.T, c client.Client) *corev1.Secret {
	t.Helper()
	var s corev1.Secret
	if err := c.Get(context.Background(), secretKey, &s); err != nil {
		t.Fatalf("get Secret: %v", err)
	}
	return &s
}

func mustEnsure(t *testing.T, c client.Client, dnsNames []string, now time.Time) *Bundle {
	t.Helper()
	b, err := Ensure(context.Background(), c, secretKey, dnsNames, now)
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	return b
}

func parsePEMCert(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(p)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("no CERTIFICATE PEM block in %q", p)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatalf("parse certificate: %v", err)
	}
	return cert
}

func checkP256Key(t *testing.T, what string, p []byte) {
	t.Helper()
	block, _ := pem.Decode(p)
	if block == nil || block.Type != "EC PRIVATE KEY" {
		t.Fatalf("%s: no EC PRIVATE KEY PEM block", what)
	}
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if key.Curve != elliptic.P256() {
		t.Errorf("%s: curve %s, want P-256", what, key.Curve.Params().Name)
	}
}

// checkBundle checks that b's serving certificate verifies against b.CA at
// now for every DNS name, and that b is what the Secret holds.
func checkBundle(t *testing.T, c client.Client, b *Bundle, dnsNames []string, now time.Time) {
	t.Helper()
	ca := parsePEMCert(t, b.CA)
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	leaf, err := x509.ParseCertificate(b.Cert.Certificate[0])
	if err != nil {
		t.Fatalf("parse serving certificate: %v", err)
	}
	for _, n := range dnsNames {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: n, CurrentTime: now}); err != nil {
			t.Errorf("verify serving certificate for %q at %v: %v", n, now, err)
		}
	}
	if !slices.Equal(leaf.DNSNames, dnsNames) {
		t.Errorf("SANs %q, want %q", leaf.DNSNames, dnsNames)
	}
	if leaf.Subject.CommonName != dnsNames[0] {
		t.Errorf("CommonName %q, want %q", leaf.Subject.CommonName, dnsNames[0])
	}
	if b.Cert.Leaf == nil || !b.Cert.Leaf.Equal(leaf) {
		t.Errorf("Cert.Leaf is not the serving certificate")
	}
	if !b.NotAfter.Equal(leaf.NotAfter) {
		t.Errorf("NotAfter %v, want the serving certificate's %v", b.NotAfter, leaf.NotAfter)
	}
	if _, ok := b.Cert.PrivateKey.(*ecdsa.PrivateKey); !ok {
		t.Errorf("serving key is %T, want *ecdsa.PrivateKey", b.Cert.PrivateKey)
	}

	s := getSecret(t, c)
	if !bytes.Equal(s.Data[keyCACert], b.CA) {
		t.Errorf("bundle CA is not the Secret's ca.crt")
	}
	if stored := parsePEMCert(t, s.Data[keyTLSCert]); !stored.Equal(leaf) {
		t.Errorf("bundle serving certificate is not the Secret's tls.crt")
	}
	if _, err := tls.X509KeyPair(s.Data[keyCACert], s.Data[keyCAKey]); err != nil {
		t.Errorf("Secret's ca.crt and ca.key: %v", err)
	}
	if _, err := tls.X509KeyPair(s.Data[keyTLSCert], s.Data[keyTLSKey]); err != nil {
		t.Errorf("Secret's tls.crt and tls.key: %v", err)
	}
}

func TestEnsureCreatesSecret(t *testing.T) {
	c := newClient(interceptor.Funcs{})
	b := mustEnsure(t, c, names, t0)
	checkBundle(t, c, b, names, t0)

	s := getSecret(t, c)
	if s.Type != corev1.SecretTypeOpaque {
		t.Errorf("Secret type %q, want %q", s.Type, corev1.SecretTypeOpaque)
	}
	if len(s.Data) != 4 {
		t.Errorf("Secret keys %v, want exactly ca.crt, ca.key, tls.crt, tls.key", slices.Sorted(maps.Keys(s.Data)))
	}
	checkP256Key(t, "ca.key", s.Data[keyCAKey])
	checkP256Key(t, "tls.key", s.Data[keyTLSKey])

	ca := parsePEMCert(t, s.Data[keyCACert])
	if !ca.IsCA || !ca.BasicConstraintsValid {
		t.Errorf("CA: IsCA %v, BasicConstraintsValid %v", ca.IsCA, ca.BasicConstraintsValid)
	}
	if want := x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature; ca.KeyUsage != want {
		t.Errorf("CA key usage %v, want %v", ca.KeyUsage, want)
	}
	if want := t0.Add(-time.Hour); !ca.NotBefore.Equal(want) {
		t.Errorf("CA NotBefore %v, want %v", ca.NotBefore, want)
	}
	if want := t0.AddDate(10, 0, 0); !ca.NotAfter.Equal(want) {
		t.Errorf("CA NotAfter %v, want %v", ca.NotAfter, want)
	}

	leaf := parsePEMCert(t, s.Data[keyTLSCert])
	if leaf.IsCA {
		t.Errorf("serving certificate is a CA")
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("serving key usage %v, want DigitalSignature", leaf.KeyUsage)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		t.Errorf("serving ext key usage %v, want ServerAuth", leaf.ExtKeyUsage)
	}
	if want := t0.Add(-time.Hour); !leaf.NotBefore.Equal(want) {
		t.Errorf("serving NotBefore %v, want %v", leaf.NotBefore, want)
	}
	if want := t0.AddDate(1, 0, 0); !leaf.NotAfter.Equal(want) || !b.NotAfter.Equal(want) {
		t.Errorf("serving NotAfter %v (bundle %v), want %v", leaf.NotAfter, b.NotAfter, want)
	}
	for _, cert := range []*x509.Certificate{ca, leaf} {
		if n := cert.SerialNumber; n.Sign() <= 0 || n.BitLen() > 128 {
			t.Errorf("serial number %v is not a positive 128-bit number", n)
		}
	}
	if ca.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Errorf("CA and serving certificate share serial number %v", ca.SerialNumber)
	}
}

func TestEnsureKeepsValidSecret(t *testing.T) {
	for _, tc := range []struct {
		name string
		now  time.Time
	}{
		{"same instant", t0},
		{"100 days later", t0.Add(days(100))},
		{"exactly 30 days left", t0.AddDate(1, 0, 0).Add(-days(30))},
		{"clock 30 minutes behind", t0.Add(-30 * time.Minute)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClient(interceptor.Funcs{})
			first := mustEnsure(t, c, names, t0)
			rv := getSecret(t, c).ResourceVersion

			second := mustEnsure(t, c, names, tc.now)
			if got := getSecret(t, c).ResourceVersion; got != rv {
				t.Errorf("Secret rewritten: resourceVersion %s, was %s", got, rv)
			}
			if !bytes.Equal(second.CA, first.CA) {
				t.Errorf("CA changed")
			}
			if !bytes.Equal(second.Cert.Certificate[0], first.Cert.Certificate[0]) {
				t.Errorf("serving certificate changed")
			}
			if !second.NotAfter.Equal(first.NotAfter) {
				t.Errorf("NotAfter %v, was %v", second.NotAfter, first.NotAfter)
			}
		})
	}
}

func TestEnsureRenews(t *testing.T) {
	otherNames := []string{"webhook.example.svc", "tandem-webhook.tandem-system.svc"}
	caNotAfter := t0.AddDate(10, 0, 0)
	// 9.95 years (87221 hours): about 18 days before the CA expires.
	caNearExpiry := 87221 * time.Hour
	for _, tc := range []struct {
		name     string
		now      time.Time
		dnsNames []string
		newCA    bool
		notAfter time.Time // of the new serving certificate
	}{
		{
			name: "serving certificate has 29 days left", now: t0.AddDate(1, 0, 0).Add(-days(29)), dnsNames: names,
			notAfter: t0.AddDate(1, 0, 0).Add(-days(29)).AddDate(1, 0, 0),
		},
		{
			name: "340 days later", now: t0.Add(days(340)), dnsNames: names,
			notAfter: t0.Add(days(340)).AddDate(1, 0, 0),
		},
		{
			name: "serving certificate expired", now: t0.Add(days(400)), dnsNames: names,
			notAfter: t0.Add(days(400)).AddDate(1, 0, 0),
		},
		{
			name: "CA near expiry (9.95 years)", now: t0.Add(caNearExpiry), dnsNames: names,
			newCA:    true,
			notAfter: t0.Add(caNearExpiry).AddDate(1, 0, 0),
		},
		{
			name: "DNS names changed", now: t0.Add(days(1)), dnsNames: otherNames,
			notAfter: t0.Add(days(1)).AddDate(1, 0, 0),
		},
		{
			name: "DNS name removed", now: t0.Add(days(1)), dnsNames: names[:1],
			notAfter: t0.Add(days(1)).AddDate(1, 0, 0),
		},
		{
			name: "DNS name added", now: t0.Add(days(1)), dnsNames: append(slices.Clone(names), "tandem-webhook"),
			notAfter: t0.Add(days(1)).AddDate(1, 0, 0),
		},
		{
			name: "serving certificate capped at the CA's expiry", now: caNotAfter.Add(-days(60)), dnsNames: otherNames,
			notAfter: caNotAfter,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClient(interceptor.Funcs{})
			first := mustEnsure(t, c, names, t0)
			rv := getSecret(t, c).ResourceVersion

			b := mustEnsure(t, c, tc.dnsNames, tc.now)
			checkBundle(t, c, b, tc.dnsNames, tc.now)
			if getSecret(t, c).ResourceVersion == rv {
				t.Errorf("Secret not rewritten")
			}
			if gotNewCA := !bytes.Equal(b.CA, first.CA); gotNewCA != tc.newCA {
				t.Errorf("new CA: %v, want %v", gotNewCA, tc.newCA)
			}
			if bytes.Equal(b.Cert.Certificate[0], first.Cert.Certificate[0]) {
				t.Errorf("serving certificate not renewed")
			}
			if !b.NotAfter.Equal(tc.notAfter) {
				t.Errorf("NotAfter %v, want %v", b.NotAfter, tc.notAfter)
			}
			if tc.newCA {
				if got, want := parsePEMCert(t, b.CA).NotAfter, tc.now.AddDate(10, 0, 0); !got.Equal(want) {
					t.Errorf("new CA NotAfter %v, want %v", got, want)
				}
			}

			// And it is stable again.
			again := mustEnsure(t, c, tc.dnsNames, tc.now)
			if !bytes.Equal(again.CA, b.CA) || !bytes.Equal(again.Cert.Certificate[0], b.Cert.Certificate[0]) {
				t.Errorf("a further Ensure changed the bundle")
			}
		})
	}
}

func TestEnsureRepairsDamagedSecret(t *testing.T) {
	// Material from another Secret: a valid CA and serving certificate that
	// are not this Secret's.
	foreign := getSecret(t, func() client.Client {
		c := newClient(interceptor.Funcs{})
		mustEnsure(t, c, names, t0)
		return c
	}()).Data

	for _, tc := range []struct {
		name   string
		damage func(d map[string][]byte)
		newCA  bool
	}{
		{"garbage in tls.crt", func(d map[string][]byte) { d[keyTLSCert] = []byte("garbage") }, false},
		{"PEM garbage in tls.crt", func(d map[string][]byte) {
			d[keyTLSCert] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("garbage")})
		}, false},
		{"tls.key missing", func(d map[string][]byte) { delete(d, keyTLSKey) }, false},
		{"tls.key of another certificate", func(d map[string][]byte) { d[keyTLSKey] = foreign[keyTLSKey] }, false},
		{"serving certificate of another CA", func(d map[string][]byte) {
			d[keyTLSCert], d[keyTLSKey] = foreign[keyTLSCert], foreign[keyTLSKey]
		}, false},
		{"ca.key missing", func(d map[string][]byte) { delete(d, keyCAKey) }, true},
		{"garbage in ca.crt", func(d map[string][]byte) { d[keyCACert] = []byte("garbage") }, true},
		{"ca.key of another CA", func(d map[string][]byte) { d[keyCAKey] = foreign[keyCAKey] }, true},
		{"ca.crt is not a CA", func(d map[string][]byte) {
			d[keyCACert], d[keyCAKey] = d[keyTLSCert], d[keyTLSKey]
		}, true},
		{"everything missing", func(d map[string][]byte) {
			for k := range d {
				delete(d, k)
			}
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClient(interceptor.Funcs{})
			first := mustEnsure(t, c, names, t0)

			s := getSecret(t, c)
			tc.damage(s.Data)
			s.Data["unrelated"] = []byte("kept")
			if err := c.Update(context.Background(), s); err != nil {
				t.Fatalf("damage Secret: %v", err)
			}

			b := mustEnsure(t, c, names, t0.Add(time.Hour))
			checkBundle(t, c, b, names, t0.Add(time.Hour))
			if gotNewCA := !bytes.Equal(b.CA, first.CA); gotNewCA != tc.newCA {
				t.Errorf("new CA: %v, want %v", gotNewCA, tc.newCA)
			}
			if bytes.Equal(b.Cert.Certificate[0], first.Cert.Certificate[0]) {
				t.Errorf("serving certificate not replaced")
			}
			if got := string(getSecret(t, c).Data["unrelated"]); got != "kept" {
				t.Errorf("unrelated key: %q, want it kept", got)
			}
		})
	}
}

func TestEnsureKeepsExistingSecretType(t *testing.T) {
	c := newClient(interceptor.Funcs{}, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: secretKey.Namespace, Name: secretKey.Name},
		Type:       corev1.SecretTypeTLS,
	})
	b := mustEnsure(t, c, names, t0)
	checkBundle(t, c, b, names, t0)
	if got := getSecret(t, c).Type; got != corev1.SecretTypeTLS {
		t.Errorf("Secret type %q, want it left %q", got, corev1.SecretTypeTLS)
	}
}

func TestEnsureRaceOnCreate(t *testing.T) {
	var creates atomic.Int32
	var other *Bundle
	c := newClient(interceptor.Funcs{
		Create: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.CreateOption) error {
			if creates.Add(1) == 1 {
				// The other replica creates its Secret first.
				var err error
				if other, err = Ensure(ctx, c, secretKey, names, t0); err != nil {
					return err
				}
				return apierrors.NewAlreadyExists(secretsGR, obj.GetName())
			}
			return c.Create(ctx, obj, opts...)
		},
	})

	b := mustEnsure(t, c, names, t0)
	checkBundle(t, c, b, names, t0)
	if !bytes.Equal(b.CA, other.CA) {
		t.Errorf("CA is not the other replica's")
	}
	if !bytes.Equal(b.Cert.Certificate[0], other.Cert.Certificate[0]) {
		t.Errorf("serving certificate is not the other replica's")
	}
	if n := creates.Load(); n != 1 {
		t.Errorf("%d Creates, want 1", n)
	}
}

func TestEnsureRaceOnUpdate(t *testing.T) {
	for _, tc := range []struct {
		name string
		// update is called for each Update; n counts from 1. It stores
		// what another replica wrote, if one did, in *other.
		update      func(ctx context.Context, c client.WithWatch, obj client.Object, n int32, other **Bundle) error
		wantUpdates int32
	}{
		{
			name: "Conflict once, then retried",
			update: func(ctx context.Context, c client.WithWatch, obj client.Object, n int32, _ **Bundle) error {
				if n == 1 {
					return apierrors.NewConflict(secretsGR, obj.GetName(), errors.New("the object has been modified"))
				}
				return c.Update(ctx, obj)
			},
			wantUpdates: 2,
		},
		{
			name: "other replica renewed first",
			update: func(ctx context.Context, c client.WithWatch, obj client.Object, n int32, other **Bundle) error {
				if n == 1 {
					// The other replica renews between our Get and Update;
					// ours then fails on its stale resourceVersion.
					var err error
					if *other, err = Ensure(ctx, c, secretKey, names, t0.Add(days(340))); err != nil {
						return err
					}
				}
				return c.Update(ctx, obj)
			},
			wantUpdates: 1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var updates atomic.Int32
			var other *Bundle
			c := newClient(interceptor.Funcs{
				Update: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.UpdateOption) error {
					return tc.update(ctx, c, obj, updates.Add(1), &other)
				},
			})
			first := mustEnsure(t, c, names, t0)

			now := t0.Add(days(340)) // due for renewal
			b := mustEnsure(t, c, names, now)
			checkBundle(t, c, b, names, now)
			if !bytes.Equal(b.CA, first.CA) {
				t.Errorf("CA changed")
			}
			if n := updates.Load(); n != tc.wantUpdates {
				t.Errorf("%d Updates, want %d", n, tc.wantUpdates)
			}
			if other != nil && !bytes.Equal(b.Cert.Certificate[0], other.Cert.Certificate[0]) {
				t.Errorf("serving certificate is not the one the other replica wrote")
			}
		})
	}
}

func TestEnsureGivesUp(t *testing.T) {
	for _, tc := range []struct {
		name  string
		funcs func(calls *atomic.Int32) interceptor.Funcs
		is    func(error) bool
		setup bool // create a due Secret first
	}{
		{
			name: "Create always AlreadyExists",
			funcs: func(calls *atomic.Int32) interceptor.Funcs {
				return interceptor.Funcs{Create: func(_ context.Context, _ client.WithWatch, obj client.Object, _ ...client.CreateOption) error {
					calls.Add(1)
					return apierrors.NewAlreadyExists(secretsGR, obj.GetName())
				}}
			},
			is: apierrors.IsAlreadyExists,
		},
		{
			name: "Update always Conflict",
			funcs: func(calls *atomic.Int32) interceptor.Funcs {
				return interceptor.Funcs{Update: func(_ context.Context, _ client.WithWatch, obj client.Object, _ ...client.UpdateOption) error {
					calls.Add(1)
					return apierrors.NewConflict(secretsGR, obj.GetName(), errors.New("modified"))
				}}
			},
			is:    apierrors.IsConflict,
			setup: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			var objs []client.Object
			if tc.setup {
				setup := newClient(interceptor.Funcs{})
				mustEnsure(t, setup, names, t0)
				objs = append(objs, getSecret(t, setup))
			}
			c := newClient(tc.funcs(&calls), objs...)
			_, err := Ensure(context.Background(), c, secretKey, names, t0.Add(days(340)))
			if err == nil {
				t.Fatal("Ensure succeeded")
			}
			if !tc.is(err) {
				t.Errorf("error %v does not wrap the last failure", err)
			}
			if !strings.Contains(err.Error(), secretKey.String()) {
				t.Errorf("error %q does not name the Secret %s", err, secretKey)
			}
			if n := calls.Load(); n != maxAttempts {
				t.Errorf("%d attempts, want %d", n, maxAttempts)
			}
		})
	}
}

func TestEnsureOtherErrors(t *testing.T) {
	t.Run("no DNS names", func(t *testing.T) {
		for _, dnsNames := range [][]string{nil, {}, {""}, {"a.svc", ""}} {
			var calls atomic.Int32
			c := newClient(interceptor.Funcs{Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
				calls.Add(1)
				return c.Get(ctx, key, obj, opts...)
			}})
			if _, err := Ensure(context.Background(), c, secretKey, dnsNames, t0); err == nil {
				t.Errorf("Ensure(%q) succeeded", dnsNames)
			}
			if calls.Load() != 0 {
				t.Errorf("Ensure(%q) read the Secret", dnsNames)
			}
		}
	})
	t.Run("Get fails", func(t *testing.T) {
		var calls atomic.Int32
		c := newClient(interceptor.Funcs{Get: func(_ context.Context, _ client.WithWatch, key client.ObjectKey, _ client.Object, _ ...client.GetOption) error {
			calls.Add(1)
			return apierrors.NewForbidden(secretsGR, key.Name, errors.New("no"))
		}})
		_, err := Ensure(context.Background(), c, secretKey, names, t0)
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), secretKey.String()) {
			t.Errorf("error %v: want a wrapped Forbidden naming %s", err, secretKey)
		}
		if calls.Load() != 1 {
			t.Errorf("%d Gets, want 1 (no retry)", calls.Load())
		}
	})
	t.Run("context canceled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := Ensure(ctx, newClient(interceptor.Funcs{}), secretKey, names, t0); !errors.Is(err, context.Canceled) {
			t.Errorf("error %v, want context.Canceled", err)
		}
	})
}

func TestEnsureConcurrentReplicas(t *testing.T) {
	c := newClient(interceptor.Funcs{})
	const replicas = 8
	bundles := make([]*Bundle, replicas)
	errs := make([]error, replicas)
	var wg sync.WaitGroup
	for i := range replicas {
		wg.Go(func() {
			bundles[i], errs[i] = Ensure(context.Background(), c, secretKey, names, t0)
		})
	}
	wg.Wait()
	stored := getSecret(t, c).Data[keyCACert]
	for i := range replicas {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		if !bytes.Equal(bundles[i].CA, stored) {
			t.Errorf("replica %d uses a CA that is not the stored one", i)
		}
	}
}

func webhookConfig(name string, bundles ...[]byte) *admissionregistrationv1.MutatingWebhookConfiguration {
	none := admissionregistrationv1.SideEffectClassNone
	cfg := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: name}}
	for i, b := range bundles {
		path := "/mutate"
		cfg.Webhooks = append(cfg.Webhooks, admissionregistrationv1.MutatingWebhook{
			Name: []string{"pods.tandem.dev", "pvcs.tandem.dev", "other.tandem.dev"}[i%3],
			ClientConfig: admissionregistrationv1.WebhookClientConfig{
				Service:  &admissionregistrationv1.ServiceReference{Namespace: "tandem-system", Name: "tandem-webhook", Path: &path},
				CABundle: b,
			},
			SideEffects:             &none,
			AdmissionReviewVersions: []string{"v1"},
		})
	}
	return cfg
}

func TestPatchCABundle(t *testing.T) {
	const cfgName = "tandem-mutating"
	ca := []byte("-----BEGIN CERTIFICATE-----\nnew\n-----END CERTIFICATE-----\n")
	old := []byte("-----BEGIN CERTIFICATE-----\nold\n-----END CERTIFICATE-----\n")

	for _, tc := range []struct {
		name        string
		objs        []client.Object
		conflicts   int32 // Patches that another writer beats
		wantFound   bool
		wantPatches int32
	}{
		{name: "absent configuration", wantFound: false, wantPatches: 0},
		{name: "two webhooks with empty caBundle", objs: []client.Object{webhookConfig(cfgName, nil, nil)}, wantFound: true, wantPatches: 1},
		{name: "already right", objs: []client.Object{webhookConfig(cfgName, ca, ca)}, wantFound: true, wantPatches: 0},
		{name: "one webhook stale", objs: []client.Object{webhookConfig(cfgName, ca, old)}, wantFound: true, wantPatches: 1},
		{name: "no webhooks", objs: []client.Object{webhookConfig(cfgName)}, wantFound: true, wantPatches: 0},
		{name: "configuration changed meanwhile", objs: []client.Object{webhookConfig(cfgName, old, nil)}, conflicts: 1, wantFound: true, wantPatches: 2},
		{name: "other configurations untouched", objs: []client.Object{webhookConfig("other", nil)}, wantFound: false, wantPatches: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var patches atomic.Int32
			c := newClient(interceptor.Funcs{
				Patch: func(ctx context.Context, c client.WithWatch, obj client.Object, patch client.Patch, opts ...client.PatchOption) error {
					if patches.Add(1) <= tc.conflicts {
						// Someone else changes the configuration between our
						// Get and Patch: the optimistic lock must refuse ours.
						var cur admissionregistrationv1.MutatingWebhookConfiguration
						if err := c.Get(ctx, client.ObjectKeyFromObject(obj), &cur); err != nil {
							return err
						}
						cur.Labels = map[string]string{"touched": "yes"}
						if err := c.Update(ctx, &cur); err != nil {
							return err
						}
					}
					return c.Patch(ctx, obj, patch, opts...)
				},
			}, tc.objs...)

			found, err := PatchCABundle(context.Background(), c, cfgName, ca)
			if err != nil {
				t.Fatalf("PatchCABundle: %v", err)
			}
			if found != tc.wantFound {
				t.Errorf("found %v, want %v", found, tc.wantFound)
			}
			if n := patches.Load(); n != tc.wantPatches {
				t.Errorf("%d patches, want %d", n, tc.wantPatches)
			}
			if !found {
				return
			}
			var cfg admissionregistrationv1.MutatingWebhookConfiguration
			if err := c.Get(context.Background(), client.ObjectKey{Name: cfgName}, &cfg); err != nil {
				t.Fatal(err)
			}
			want := tc.objs[0].(*admissionregistrationv1.MutatingWebhookConfiguration)
			if len(cfg.Webhooks) != len(want.Webhooks) {
				t.Fatalf("%d webhooks, want %d", len(cfg.Webhooks), len(want.Webhooks))
			}
			for i, w := range cfg.Webhooks {
				if !bytes.Equal(w.ClientConfig.CABundle, ca) {
					t.Errorf("webhook %s caBundle %q, want %q", w.Name, w.ClientConfig.CABundle, ca)
				}
				if w.Name != want.Webhooks[i].Name || w.ClientConfig.Service == nil || w.ClientConfig.Service.Name != "tandem-webhook" {
					t.Errorf("webhook %d changed beyond its caBundle: %+v", i, w)
				}
			}
			if tc.conflicts > 0 && cfg.Labels["touched"] != "yes" {
				t.Errorf("the other writer's change was lost")
			}
		})
	}
}

func TestPatchCABundleErrors(t *testing.T) {
	t.Run("empty ca", func(t *testing.T) {
		c := newClient(interceptor.Funcs{}, webhookConfig("cfg", nil))
		if _, err := PatchCABundle(context.Background(), c, "cfg", nil); err == nil {
			t.Error("PatchCABundle with an empty CA succeeded")
		}
	})
	t.Run("Patch fails", func(t *testing.T) {
		c := newClient(interceptor.Funcs{
			Patch: func(context.Context, client.WithWatch, client.Object, client.Patch, ...client.PatchOption) error {
				return apierrors.NewForbidden(schema.GroupResource{Group: "admissionregistration.k8s.io", Resource: "mutatingwebhookconfigurations"}, "cfg", errors.New("no"))
			},
		}, webhookConfig("cfg", nil))
		found, err := PatchCABundle(context.Background(), c, "cfg", []byte("ca"))
		if found || !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "cfg") {
			t.Errorf("PatchCABundle = %v, %v; want false and a wrapped Forbidden naming cfg", found, err)
		}
	})
	t.Run("Conflict every time", func(t *testing.T) {
		var patches atomic.Int32
		c := newClient(interceptor.Funcs{
			Patch: func(_ context.Context, _ client.WithWatch, obj client.Object, _ client.Patch, _ ...client.PatchOption) error {
				patches.Add(1)
				return apierrors.NewConflict(schema.GroupResource{Resource: "mutatingwebhookconfigurations"}, obj.GetName(), errors.New("modified"))
			},
		}, webhookConfig("cfg", nil))
		_, err := PatchCABundle(context.Background(), c, "cfg", []byte("ca"))
		if !apierrors.IsConflict(err) {
			t.Errorf("error %v, want a wrapped Conflict", err)
		}
		if patches.Load() != maxAttempts {
			t.Errorf("%d patches, want %d", patches.Load(), maxAttempts)
		}
	})
}

func TestHolder(t *testing.T) {
	var h Holder
	if cert, err := h.GetCertificate(nil); err == nil {
		t.Fatalf("GetCertificate before Set = %v, want an error", cert)
	}

	c := newClient(interceptor.Funcs{})
	b1 := mustEnsure(t, c, names, t0)
	h.Set(b1)
	cert, err := h.GetCertificate(&tls.ClientHelloInfo{ServerName: names[0]})
	if err != nil {
		t.Fatalf("GetCertificate: %v", err)
	}
	if !bytes.Equal(cert.Certificate[0], b1.Cert.Certificate[0]) {
		t.Errorf("GetCertificate returned another certificate")
	}

	b2 := mustEnsure(t, c, names, t0.Add(days(340)))
	h.Set(b2)
	if cert, err := h.GetCertificate(nil); err != nil || !bytes.Equal(cert.Certificate[0], b2.Cert.Certificate[0]) {
		t.Errorf("after a second Set: GetCertificate = %v, %v; want the renewed certificate", cert, err)
	}

	h.Set(nil)
	if _, err := h.GetCertificate(nil); err == nil {
		t.Errorf("GetCertificate after Set(nil) succeeded")
	}
}

// TestHolderServesTLS runs a handshake in which the client trusts only the
// bundle's CA, as the API server does with the caBundle.
func TestHolderServesTLS(t *testing.T) {
	b := mustEnsure(t, newClient(interceptor.Funcs{}), names, t0)
	var h Holder
	h.Set(b)

	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(b.CA) {
		t.Fatal("bundle CA is not PEM")
	}
	clock := func() time.Time { return t0.Add(time.Minute) }
	serverConn, clientConn := net.Pipe()
	defer serverConn.Close()
	defer clientConn.Close()

	server := tls.Server(serverConn, &tls.Config{GetCertificate: h.GetCertificate, Time: clock})
	serverErr := make(chan error, 1)
	go func() { serverErr <- server.Handshake() }()

	cl := tls.Client(clientConn, &tls.Config{RootCAs: roots, ServerName: names[1], Time: clock})
	if err := cl.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-serverErr; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	if peer := cl.ConnectionState().PeerCertificates[0]; !bytes.Equal(peer.Raw, b.Cert.Certificate[0]) {
		t.Errorf("server presented another certificate")
	}
}
