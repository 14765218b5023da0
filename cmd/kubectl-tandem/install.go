package main

import (
	"context"
	"fmt"
	"path"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// How the plugin finds the Tandem install: the agents' DaemonSet and the
// manager's Deployment carry these labels both in config/ (kustomize) and in
// the Helm chart, whatever the release is called. The install's namespace is
// the DaemonSet's; the agents' token Secret is the one the DaemonSet mounts
// for the agent's --token-file.
const (
	defaultAgentSelector   = "app.kubernetes.io/name=tandem,app.kubernetes.io/component=agent"
	defaultManagerSelector = "app.kubernetes.io/name=tandem,app.kubernetes.io/component=manager"
	agentContainer         = "agent"
)

// scope says where a search looked, for messages.
func scope(ns string) string {
	if ns == "" {
		return "in any namespace"
	}
	return "in namespace " + ns
}

// listBySelector lists the objects matching selector in ns ("" is every namespace).
func listBySelector(ctx context.Context, c client.Client, list client.ObjectList, selector, ns string) error {
	sel, err := labels.Parse(selector)
	if err != nil {
		return fmt.Errorf("label selector %q: %w", selector, err)
	}
	opts := []client.ListOption{client.MatchingLabelsSelector{Selector: sel}}
	if ns != "" {
		opts = append(opts, client.InNamespace(ns))
	}
	return c.List(ctx, list, opts...)
}

// findAgents returns the one agent DaemonSet matching selector in ns (""
// searches every namespace). None or several is an error that says what was
// looked for, and where.
func findAgents(ctx context.Context, c client.Client, selector, ns string) (*appsv1.DaemonSet, error) {
	var l appsv1.DaemonSetList
	if err := listBySelector(ctx, c, &l, selector, ns); err != nil {
		if apierrors.IsForbidden(err) {
			return nil, fmt.Errorf("find the Tandem agents (DaemonSets with labels %s %s): you may not list DaemonSets there; "+
				"pass --operator-namespace NS (where Tandem is installed) and --token-file FILE (the agents' token), which need no DaemonSet: %w", selector, scope(ns), err)
		}
		return nil, fmt.Errorf("find the Tandem agents (DaemonSets with labels %s %s): %w", selector, scope(ns), err)
	}
	switch len(l.Items) {
	case 0:
		return nil, fmt.Errorf("found no Tandem agents: no DaemonSet with labels %s %s (is Tandem installed? pass --operator-namespace, --agent-selector, or --token-file)", selector, scope(ns))
	case 1:
		return &l.Items[0], nil
	}
	var names []string
	for _, ds := range l.Items {
		names = append(names, ds.Namespace+"/"+ds.Name)
	}
	sort.Strings(names)
	return nil, fmt.Errorf("found %d Tandem installs: DaemonSets %s all have labels %s %s; pick one with --operator-namespace (or --agent-selector)",
		len(names), strings.Join(names, ", "), selector, scope(ns))
}

// tokenRef is where an agent DaemonSet takes its bearer token from.
type tokenRef struct {
	namespace, secret, key string
}

func (r tokenRef) String() string {
	return fmt.Sprintf("secret %s/%s (key %s)", r.namespace, r.secret, r.key)
}

// agentTokenRef finds the Secret and key that ds mounts as the file its agent
// container reads with --token-file.
func agentTokenRef(ds *appsv1.DaemonSet) (tokenRef, error) {
	where := fmt.Sprintf("DaemonSet %s/%s", ds.Namespace, ds.Name)
	spec := &ds.Spec.Template.Spec
	var ctr *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == agentContainer || ctr == nil {
			ctr = &spec.Containers[i]
		}
	}
	if ctr == nil {
		return tokenRef{}, fmt.Errorf("%s has no containers", where)
	}
	file := ""
	args := append(append([]string{}, ctr.Command...), ctr.Args...)
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--token-file="); ok {
			file = v
		} else if a == "--token-file" && i+1 < len(args) {
			file = args[i+1]
		}
	}
	if file == "" {
		return tokenRef{}, fmt.Errorf("%s: container %s has no --token-file argument (pass --token-file)", where, ctr.Name)
	}
	file = path.Clean(file)
	for _, m := range ctr.VolumeMounts {
		dir := path.Clean(m.MountPath)
		var rel string
		if r, ok := strings.CutPrefix(file, dir+"/"); ok {
			rel = path.Join(m.SubPath, r)
		} else if file == dir && m.SubPath != "" {
			rel = path.Clean(m.SubPath)
		} else {
			continue
		}
		for _, v := range spec.Volumes {
			if v.Name != m.Name {
				continue
			}
			if v.Secret == nil {
				return tokenRef{}, fmt.Errorf("%s: the agent's --token-file %s is on volume %s, which is not a Secret (pass --token-file)", where, file, v.Name)
			}
			key := rel
			if len(v.Secret.Items) > 0 {
				key = ""
				for _, it := range v.Secret.Items {
					if path.Clean(it.Path) == rel {
						key = it.Key
					}
				}
				if key == "" {
					return tokenRef{}, fmt.Errorf("%s: volume %s (secret %s) maps no key to %s", where, v.Name, v.Secret.SecretName, rel)
				}
			}
			return tokenRef{namespace: ds.Namespace, secret: v.Secret.SecretName, key: key}, nil
		}
		return tokenRef{}, fmt.Errorf("%s: volume mount %s has no volume", where, m.Name)
	}
	return tokenRef{}, fmt.Errorf("%s: no volume of container %s is mounted where its --token-file %s is (pass --token-file)", where, ctr.Name, file)
}
