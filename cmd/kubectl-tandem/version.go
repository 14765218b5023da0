package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/printers"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/tandem-storage/tandem/internal/version"
)

// versionReport is what kubectl tandem version prints (-o json|yaml).
type versionReport struct {
	Plugin version.Info `json:"plugin"`
	// Managers and Agents are the install's workloads, found by their labels
	// in every namespace; empty with --client.
	Managers []workloadVersion `json:"managers,omitempty"`
	Agents   []workloadVersion `json:"agents,omitempty"`
	// ClusterError says why the cluster's versions are missing.
	ClusterError string `json:"clusterError,omitempty"`
}

// workloadVersion is the version of a manager Deployment or agent DaemonSet.
type workloadVersion struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Version is the app.kubernetes.io/version label (set by the chart).
	Version string `json:"version,omitempty"`
	// Image is the main container's image in the workload's spec.
	Image string `json:"image"`
	// Running counts the pods by the image their main container runs: during
	// a rollout there are two.
	Running []imagePods `json:"running"`
}

type imagePods struct {
	Image string `json:"image"`
	Pods  int    `json:"pods"`
}

func newVersionCmd(o *rootOptions) *cobra.Command {
	var (
		out        *outputFlags
		clientOnly bool
	)
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the plugin's version, and the manager's and agents' when the cluster is reachable",
		Long: `Print the plugin's version (stamped at build time: make build or make
release), and the versions of the Tandem managers and agents installed in the
cluster: their Deployments and DaemonSets (labels app.kubernetes.io/name=tandem
and app.kubernetes.io/component=manager or agent, in every namespace), the
image each declares and the images their pods run.

An unreachable cluster is not an error: the plugin's version is printed and
the reason is reported (clusterError in -o json).`,
		Example: `  kubectl tandem version
  kubectl tandem version --client
  kubectl tandem version -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var p printers.ResourcePrinter
			if !out.human() {
				var err error
				if p, err = out.printer(); err != nil {
					return err
				}
			}
			rep := &versionReport{Plugin: version.Get()}
			if !clientOnly {
				if err := clusterVersions(cmd.Context(), o, rep); err != nil {
					rep.ClusterError = err.Error()
				}
			}
			if !out.human() {
				return out.printReport(p, o.streams.Out, rep)
			}
			return renderVersion(o.streams.Out, rep, clientOnly)
		},
	}
	out = addReportOutput(cmd, "the versions")
	cmd.Flags().BoolVar(&clientOnly, "client", false, "Print the plugin's version only; do not contact the cluster.")
	return cmd
}

func clusterVersions(ctx context.Context, o *rootOptions, rep *versionReport) error {
	c, err := o.newClient()
	if err != nil {
		return err
	}
	var deps appsv1.DeploymentList
	if err := listBySelector(ctx, c, &deps, defaultManagerSelector, ""); err != nil {
		return fmt.Errorf("list the manager Deployments (labels %s): %w", defaultManagerSelector, err)
	}
	for i := range deps.Items {
		d := &deps.Items[i]
		w, err := workloadOf(ctx, c, "Deployment", &d.ObjectMeta, d.Spec.Selector, &d.Spec.Template.Spec, "manager")
		if err != nil {
			return err
		}
		rep.Managers = append(rep.Managers, w)
	}
	var dss appsv1.DaemonSetList
	if err := listBySelector(ctx, c, &dss, defaultAgentSelector, ""); err != nil {
		return fmt.Errorf("list the agent DaemonSets (labels %s): %w", defaultAgentSelector, err)
	}
	for i := range dss.Items {
		d := &dss.Items[i]
		w, err := workloadOf(ctx, c, "DaemonSet", &d.ObjectMeta, d.Spec.Selector, &d.Spec.Template.Spec, agentContainer)
		if err != nil {
			return err
		}
		rep.Agents = append(rep.Agents, w)
	}
	return nil
}

// workloadOf reads what a workload declares and what its pods run; the main
// container is the one called ctrName, else the first.
func workloadOf(ctx context.Context, c client.Client, kind string, m *metav1.ObjectMeta, sel *metav1.LabelSelector, spec *corev1.PodSpec, ctrName string) (workloadVersion, error) {
	w := workloadVersion{Kind: kind, Namespace: m.Namespace, Name: m.Name, Version: m.Labels["app.kubernetes.io/version"], Running: []imagePods{}}
	if i := mainContainer(spec.Containers, ctrName); i >= 0 {
		w.Image = spec.Containers[i].Image
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return w, fmt.Errorf("%s %s/%s: selector: %w", kind, m.Namespace, m.Name, err)
	}
	var pods corev1.PodList
	if err := listBySelector(ctx, c, &pods, s.String(), m.Namespace); err != nil {
		return w, fmt.Errorf("list the pods of %s %s/%s: %w", kind, m.Namespace, m.Name, err)
	}
	count := map[string]int{}
	for _, p := range pods.Items {
		img := ""
		for _, st := range p.Status.ContainerStatuses {
			if st.Name == ctrName || (img == "" && len(p.Status.ContainerStatuses) == 1) {
				img = st.Image
			}
		}
		if img == "" {
			if i := mainContainer(p.Spec.Containers, ctrName); i >= 0 {
				img = p.Spec.Containers[i].Image
			}
		}
		count[img]++
	}
	for img, n := range count {
		w.Running = append(w.Running, imagePods{Image: img, Pods: n})
	}
	sort.Slice(w.Running, func(i, j int) bool { return w.Running[i].Image < w.Running[j].Image })
	return w, nil
}

func mainContainer(cs []corev1.Container, name string) int {
	for i := range cs {
		if cs[i].Name == name {
			return i
		}
	}
	if len(cs) > 0 {
		return 0
	}
	return -1
}

func renderVersion(w io.Writer, rep *versionReport, clientOnly bool) error {
	var b strings.Builder
	pi := rep.Plugin
	commit := ""
	if pi.Commit != "" {
		commit = ", commit " + pi.Commit
	}
	fmt.Fprintf(&b, "Plugin: %s (%s, %s%s)\n", pi.Version, pi.GoVersion, pi.Platform, commit)
	switch {
	case clientOnly:
	case rep.ClusterError != "":
		fmt.Fprintf(&b, "Cluster: not reachable: %s\n", rep.ClusterError)
	case len(rep.Managers) == 0 && len(rep.Agents) == 0:
		fmt.Fprintf(&b, "Cluster: no Tandem install found (no Deployment with labels %s, no DaemonSet with labels %s)\n", defaultManagerSelector, defaultAgentSelector)
	default:
		tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "COMPONENT\tNAMESPACE/NAME\tVERSION\tIMAGE\tRUNNING")
		row := func(what string, ws []workloadVersion) {
			if len(ws) == 0 {
				fmt.Fprintf(tw, "%s\t(none found)\t-\t-\t-\n", what)
			}
			for _, v := range ws {
				var run []string
				for _, r := range v.Running {
					run = append(run, fmt.Sprintf("%s (%d)", orDash(r.Image), r.Pods))
				}
				fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\n", what, v.Namespace, v.Name, orDash(v.Version), orDash(v.Image), orDash(strings.Join(run, ", ")))
			}
		}
		row("manager", rep.Managers)
		row("agents", rep.Agents)
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write output: %w", err)
	}
	return nil
}
