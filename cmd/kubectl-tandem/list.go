package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/duration"
	"k8s.io/cli-runtime/pkg/printers"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func newListCmd(o *rootOptions) *cobra.Command {
	var (
		out           *outputFlags
		allNamespaces bool
		selector      string
	)
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls", "get"},
		Short:   "List VolumePairs: phase, who serves, what is out of sync",
		Long: `List the VolumePairs of the namespace (-n) or of every namespace (-A), with
the columns of kubectl get volumepairs; -o wide adds the claim, unmerged
regions, epoch and NBD endpoint. With -o json, yaml, name, jsonpath=... or
go-template=... it prints the VolumePairs as kubectl get does (a list).`,
		Example: `  kubectl tandem list -A
  kubectl tandem list -n prod -o wide
  kubectl tandem list -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.status.phase}{"\n"}{end}'`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("list takes no arguments (got %q): to show one VolumePair, kubectl tandem status %s; to list some, -l KEY=VALUE; see 'kubectl tandem list --help'", strings.Join(args, " "), args[0])
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			wide := out.format() == "wide"
			var p printers.ResourcePrinter
			if !wide && !out.human() {
				var err error
				if p, err = out.printer(); err != nil {
					return err
				}
			}
			var ns string
			if !allNamespaces {
				var err error
				if ns, err = o.namespace(); err != nil {
					return err
				}
			}
			c, err := o.newClient()
			if err != nil {
				return err
			}
			var l storagev1alpha1.VolumePairList
			if err := listBySelector(cmd.Context(), c, &l, selector, ns); err != nil {
				return explainAPIError("list volumepairs "+scope(ns), err)
			}
			if p != nil {
				return printList(out, p, o, &l)
			}
			if len(l.Items) == 0 {
				why := ""
				if ns != "" && namespaceMissing(cmd.Context(), c, ns) {
					why = fmt.Sprintf(": namespace %s does not exist (kubectl tandem list -A lists the VolumePairs of every namespace)", ns)
				}
				_, err := fmt.Fprintf(o.streams.ErrOut, "No VolumePairs found %s%s.\n", scope(ns), why)
				return err
			}
			tp := printers.NewTablePrinter(printers.PrintOptions{Wide: wide, WithNamespace: allNamespaces})
			return tp.PrintObj(pairTable(l.Items, time.Now()), o.streams.Out)
		},
	}
	out = addListOutput(cmd, "the VolumePairs")
	cmd.Flags().BoolVarP(&allNamespaces, "all-namespaces", "A", false, "List the VolumePairs of every namespace.")
	cmd.Flags().StringVarP(&selector, "selector", "l", "", "Label selector (e.g. app=db).")
	return cmd
}

// printList prints the VolumePairs with p as kubectl get -o does: each item
// with its apiVersion and kind, in a List.
func printList(out *outputFlags, p printers.ResourcePrinter, o *rootOptions, l *storagev1alpha1.VolumePairList) error {
	l = l.DeepCopy()
	for i := range l.Items {
		l.Items[i].SetGroupVersionKind(volumePairGVK)
	}
	l.SetGroupVersionKind(storagev1alpha1.GroupVersion.WithKind("VolumePairList"))
	if out.format() == "name" {
		// The name printer takes the items one by one (kubectl get
		// flattens its lists the same way).
		for i := range l.Items {
			if err := p.PrintObj(&l.Items[i], o.streams.Out); err != nil {
				return fmt.Errorf("print volumepair %s: %w", l.Items[i].Name, err)
			}
		}
		return nil
	}
	var in runtime.Object = l
	if out.templated() {
		var err error
		if in, err = templateInput(l); err != nil {
			return err
		}
	}
	if err := p.PrintObj(in, o.streams.Out); err != nil {
		return fmt.Errorf("print the volumepairs: %w", err)
	}
	return nil
}

// readyReason is the Ready condition's reason (the STATUS printer column).
func readyReason(vp *storagev1alpha1.VolumePair) string {
	if c := meta.FindStatusCondition(vp.Status.Conditions, storagev1alpha1.ConditionReady); c != nil {
		return c.Reason
	}
	return ""
}

// pairTable is the VolumePairs as a Table with the CRD's printer columns
// (priority 1: only with -o wide).
func pairTable(items []storagev1alpha1.VolumePair, now time.Time) *metav1.Table {
	t := &metav1.Table{ColumnDefinitions: []metav1.TableColumnDefinition{
		{Name: "Name", Type: "string", Format: "name"},
		{Name: "Mode", Type: "string"},
		{Name: "Primary", Type: "string"},
		{Name: "Active", Type: "string"},
		{Name: "Backup", Type: "string"},
		{Name: "Phase", Type: "string"},
		{Name: "Status", Type: "string"},
		{Name: "In-Sync", Type: "string"},
		{Name: "Out-Of-Sync", Type: "string"},
		{Name: "Claim", Type: "string", Priority: 1},
		{Name: "Unmerged", Type: "integer", Priority: 1},
		{Name: "Epoch", Type: "integer", Priority: 1},
		{Name: "Endpoint", Type: "string", Priority: 1},
		{Name: "Age", Type: "string"},
	}}
	for i := range items {
		vp := &items[i]
		var backups []string
		for _, n := range vp.Spec.MemberNodes() {
			if n != vp.Spec.Primary.Node {
				backups = append(backups, n)
			}
		}
		st := &vp.Status
		age := "<unknown>"
		if !vp.CreationTimestamp.IsZero() {
			age = duration.HumanDuration(now.Sub(vp.CreationTimestamp.Time))
		}
		t.Rows = append(t.Rows, metav1.TableRow{
			Object: runtime.RawExtension{Object: vp},
			Cells: []any{vp.Name, string(vp.Spec.Mode), vp.Spec.Primary.Node, orDash(st.ActivePrimary), strings.Join(backups, ","),
				orDash(string(st.Phase)), orDash(readyReason(vp)), orDash(st.MembersInSync), humanBytes(st.OutOfSyncBytes),
				orDash(vp.Annotations["csi.tandem.dev/pvc"]), st.UnmergedRegions, st.Epoch, orDash(st.Endpoint), age},
		})
	}
	return t
}
