package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"time"

	"github.com/go-logr/logr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/webhookcert"
)

// webhookFlags configure the Pod placement webhook (docs/install.md,
// "Where Pods run").
type webhookFlags struct {
	port                    int
	service, config, secret string
}

// setupWebhook serves the Pod placement webhook on every manager replica
// (the API server calls any of them through the Service) with a serving
// certificate kept in a Secret it creates, and keeps the configuration's
// caBundle pointing at its CA. The certificate is checked again twice a day
// and renewed 30 days before it expires.
func setupWebhook(mgr manager.Manager, namespace string, f webhookFlags) error {
	c, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()})
	if err != nil {
		return fmt.Errorf("webhook client: %w", err)
	}
	holder := &webhookcert.Holder{}
	srv := webhook.NewServer(webhook.Options{
		Port:    f.port,
		TLSOpts: []func(*tls.Config){func(cfg *tls.Config) { cfg.GetCertificate = holder.GetCertificate }},
	})
	srv.Register(csi.PodPlacementPath, &webhook.Admission{Handler: &csi.PodPlacement{
		Reader:    mgr.GetAPIReader(),
		Namespace: namespace,
		Decoder:   admission.NewDecoder(mgr.GetScheme()),
	}})
	if err := mgr.Add(srv); err != nil {
		return err
	}
	certs := &certKeeper{c: c, holder: holder, f: f, namespace: namespace, log: ctrl.Log.WithName("webhook")}
	return mgr.Add(certs)
}

// certKeeper keeps the webhook's certificate and the caBundle current.
type certKeeper struct {
	c         client.Client
	holder    *webhookcert.Holder
	f         webhookFlags
	namespace string
	log       logr.Logger
}

func (k *certKeeper) NeedLeaderElection() bool { return false }

// Start ensures the certificate at once, then every 12 hours; after a
// failure (no RBAC yet, API server unreachable) every 30 seconds. Until the
// first success the server has no certificate: the API server's calls fail
// and, with failurePolicy Ignore, Pods are admitted unchanged.
func (k *certKeeper) Start(ctx context.Context) error {
	for {
		next := 12 * time.Hour
		if err := k.ensure(ctx); err != nil {
			k.log.Error(err, "Pod placement webhook: no serving certificate yet; Pods are admitted without a node preference meanwhile")
			next = 30 * time.Second
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(next):
		}
	}
}

func (k *certKeeper) ensure(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	svc, ns := k.f.service, k.namespace
	dns := []string{svc, svc + "." + ns, svc + "." + ns + ".svc", svc + "." + ns + ".svc.cluster.local"}
	b, err := webhookcert.Ensure(ctx, k.c, client.ObjectKey{Namespace: ns, Name: k.f.secret}, dns, time.Now())
	if err != nil {
		return err
	}
	k.holder.Set(b)
	installed, err := webhookcert.PatchCABundle(ctx, k.c, k.f.config, b.CA)
	if err != nil {
		return err
	}
	if !installed {
		k.log.Info("Pod placement webhook: the MutatingWebhookConfiguration is not installed; the API server does not call it", "configuration", k.f.config)
	}
	k.log.V(1).Info("Pod placement webhook certificate", "secret", ns+"/"+k.f.secret, "notAfter", b.NotAfter)
	return nil
}
