package main

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/tandem-storage/tandem/internal/testkit"
)

// TestMetricsEndpoint serves the manager's /metrics the way main sets it up,
// against a real API server: with --metrics-secure only a token whose
// identity may get /metrics reads it (401 without a token, 403 without the
// permission), over TLS; without, anyone reads it over plain HTTP.
func TestMetricsEndpoint(t *testing.T) {
	testkit.SkipIfShort(t, "starts kube-apiserver and etcd")
	_, file, _, _ := runtime.Caller(0)
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		assets = filepath.Join(filepath.Dir(file), "..", "..", "bin")
	}
	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("envtest (kube-apiserver in %s; run `make test` or hack/tools.sh): %v", assets, err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	cs := kubernetes.NewForConfigOrDie(cfg)

	// Two service accounts; only "reader" is bound to a role like the
	// chart's <fullname>-metrics-reader.
	const ns = "default"
	for _, n := range []string{"reader", "nobody"} {
		if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cs.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "metrics-reader"},
		Rules:      []rbacv1.PolicyRule{{NonResourceURLs: []string{"/metrics"}, Verbs: []string{"get"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "metrics-reader"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "metrics-reader"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "reader", Namespace: ns}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	token := func(sa string) string {
		tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return tr.Status.Token
	}
	reader, nobody := token("reader"), token("nobody")

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		// The certificate is self-signed, made at start.
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
	get := func(url, token string) (int, string) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer func() { _ = resp.Body.Close() }()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	serve := func(secure bool) string {
		t.Helper()
		addr := freeAddr(t)
		opts, err := metricsOptions(cfg, addr, secure, "")
		if err != nil {
			t.Fatal(err)
		}
		hc, err := rest.HTTPClientFor(cfg)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := metricsserver.NewServer(opts, cfg, hc)
		if err != nil {
			t.Fatal(err)
		}
		sctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); _ = srv.Start(sctx) }()
		t.Cleanup(func() { stop(); <-done })
		url := "http://" + addr + "/metrics"
		if secure {
			url = "https://" + addr + "/metrics"
		}
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if code, _ := get(url, ""); code != 0 {
				return url
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never answered", url)
			}
		}
	}

	t.Run("secure", func(t *testing.T) {
		url := serve(true)
		if code, body := get(url, ""); code != http.StatusUnauthorized {
			t.Errorf("GET /metrics without a token = %d %q, want 401", code, body)
		}
		// controller-runtime's filter answers 500 "Authentication failed"
		// when the TokenReview rejects the token with an error, as it does
		// for a malformed one; refused either way.
		if code, body := get(url, "not-a-token"); code != http.StatusUnauthorized && code != http.StatusInternalServerError {
			t.Errorf("GET /metrics with a bad token = %d %q, want 401 or 500", code, body)
		}
		if code, body := get(url, nobody); code != http.StatusForbidden {
			t.Errorf("GET /metrics as a service account without the role = %d %q, want 403", code, body)
		}
		code, body := get(url, reader)
		if code != http.StatusOK || !strings.Contains(body, "tandem_failover_duration_seconds") {
			t.Errorf("GET /metrics as the reader = %d, want 200 with the manager's metrics:\n%.500s", code, body)
		}
		if code, _ := get(strings.Replace(url, "https://", "http://", 1), reader); code == http.StatusOK {
			t.Error("plain HTTP answered on the secure port")
		}
	})
	t.Run("plain", func(t *testing.T) {
		url := serve(false)
		if code, body := get(url, ""); code != http.StatusOK || !strings.Contains(body, "tandem_failover_duration_seconds") {
			t.Errorf("GET /metrics = %d, want 200 with the manager's metrics:\n%.500s", code, body)
		}
	})
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().String()
}
