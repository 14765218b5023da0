package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/tandem-storage/tandem/internal/agentca"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// How verify calls agents that serve mutual TLS (an https:// endpoint on
// their Lease; the manager's --agent-tls=issue): with --tls-dir, the
// certificate in that directory; otherwise the plugin reads the agents' CA
// from its Secret in the install's namespace (named by the manager
// Deployment's --agent-ca-name, default tandem-agent-ca) and signs itself,
// in memory, a manager certificate (spiffe://tandem.dev/manager) valid for
// managerCertLifetime: the agents let only the manager's identity ask for
// a resync (--repair).

// managerCertLifetime is the lifetime of the manager certificate the
// plugin signs itself.
const managerCertLifetime = 15 * time.Minute

// agentTLS is the TLS config of the calls to agents that serve HTTPS.
func (vo *verifyOptions) agentTLS(ctx context.Context, c client.Client, operatorNS string) (*tls.Config, error) {
	if vo.tlsDir != "" {
		src, err := tlsid.Load(vo.tlsDir)
		if err != nil {
			return nil, fmt.Errorf("--tls-dir: %w", err)
		}
		return src.ClientConfig(nil), nil
	}
	name, from := agentCAName(ctx, c, operatorNS)
	cfg, err := agentca.ClientTLS(ctx, c, operatorNS, name, managerCertLifetime)
	if err == nil {
		return cfg, nil
	}
	switch {
	case apierrors.IsForbidden(err):
		return nil, fmt.Errorf("the agents serve mutual TLS, and verify calls them with a manager certificate it signs with their CA, read from secret %s/%s (%s): you may not read that Secret; "+
			"get permission to get secrets/%s in namespace %s, or pass --tls-dir DIR holding a manager certificate (tls.crt, tls.key, ca.crt; ask whoever administers Tandem): %w",
			operatorNS, name, from, name, operatorNS, err)
	case apierrors.IsNotFound(err):
		return nil, fmt.Errorf("the agents serve mutual TLS, but their CA's secret %s/%s (%s) does not exist: is the manager running with --agent-tls=issue (it creates it)? "+
			"If the agents' certificates come from elsewhere, pass --tls-dir DIR holding a manager certificate (tls.crt, tls.key, ca.crt): %w", operatorNS, name, from, err)
	}
	return nil, fmt.Errorf("the agents serve mutual TLS: a manager certificate from their CA's secret %s/%s (%s), or pass --tls-dir DIR: %w", operatorNS, name, from, err)
}

// agentCAName returns the name of the agents' CA Secret: the manager
// Deployment's --agent-ca-name in ns, else agentca.DefaultName; from says
// where the name came from, for messages.
func agentCAName(ctx context.Context, c client.Client, ns string) (name, from string) {
	var l appsv1.DeploymentList
	if err := listBySelector(ctx, c, &l, defaultManagerSelector, ns); err != nil || len(l.Items) == 0 {
		return agentca.DefaultName, "the default name; no manager Deployment with labels " + defaultManagerSelector + " found in namespace " + ns
	}
	for _, d := range l.Items {
		for _, ctr := range d.Spec.Template.Spec.Containers {
			if v, ok := flagValue(append(append([]string{}, ctr.Command...), ctr.Args...), "agent-ca-name"); ok {
				return v, fmt.Sprintf("the --agent-ca-name of Deployment %s/%s", d.Namespace, d.Name)
			}
		}
	}
	return agentca.DefaultName, fmt.Sprintf("the default name; Deployment %s/%s has no --agent-ca-name", l.Items[0].Namespace, l.Items[0].Name)
}

// flagValue returns the value of flag name in args, as Go's flag package
// reads it (-name=v, --name=v, -name v, --name v); the last one wins.
func flagValue(args []string, name string) (string, bool) {
	v, found := "", false
	for i, arg := range args {
		if !strings.HasPrefix(arg, "-") {
			continue
		}
		a := strings.TrimPrefix(strings.TrimPrefix(arg, "-"), "-")
		if rest, ok := strings.CutPrefix(a, name+"="); ok {
			v, found = rest, true
		} else if a == name && i+1 < len(args) {
			v, found = args[i+1], true
		}
	}
	return v, found
}
