package main

import (
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Shell completion: cobra's completion command (kubectl tandem completion
// bash|zsh|fish|powershell) writes the script; the script asks the plugin
// (its hidden __complete command) for candidates, which these functions
// read from the cluster with the connection flags typed so far (-n,
// --context, --kubeconfig...). An unreachable cluster completes nothing
// rather than file names.

// completePairNames completes the NAME argument with the VolumePairs of the
// namespace (-n, or the context's).
func (o *rootOptions) completePairNames(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ns, c, err := o.connect()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var l storagev1alpha1.VolumePairList
	if err := listBySelector(cmd.Context(), c, &l, "", ns); err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	names := make([]string, 0, len(l.Items))
	for _, vp := range l.Items {
		names = append(names, vp.Name)
	}
	return withPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

// completeNamespaces completes -n and --operator-namespace.
func (o *rootOptions) completeNamespaces(cmd *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	c, err := o.newClient()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var l corev1.NamespaceList
	if err := c.List(cmd.Context(), &l); err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	names := make([]string, 0, len(l.Items))
	for _, n := range l.Items {
		names = append(names, n.Name)
	}
	return withPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

// withPrefix keeps the names that start with prefix, sorted.
func withPrefix(names []string, prefix string) []cobra.Completion {
	var out []cobra.Completion
	for _, n := range names {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// completionShells are the shells cobra's completion command writes for.
var completionShells = []string{"bash", "zsh", "fish", "powershell"}

// initCompletionCmd adds cobra's completion command to root now, so that
// it refuses what it would otherwise answer with its help and exit status
// 0: no shell, or one it does not know (a typo that would leave the user
// sourcing nothing).
func initCompletionCmd(root *cobra.Command) {
	root.InitDefaultCompletionCmd()
	comp, _, err := root.Find([]string{"completion"})
	if err != nil || comp == root {
		return
	}
	want := strings.Join(completionShells, ", ")
	comp.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("unknown shell %q: %s writes the script for %s", args[0], cmd.CommandPath(), want)
		}
		return nil
	}
	comp.RunE = func(cmd *cobra.Command, _ []string) error {
		return fmt.Errorf("%s needs the shell, one of %s; e.g. source <(kubectl-tandem completion bash)", cmd.CommandPath(), want)
	}
}
