package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/printers"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"
)

// outputFlags is a subcommand's -o, through cli-runtime's PrintFlags: the
// formats of kubectl get (json, yaml, kyaml, name, jsonpath=..., go-template=...
// and their -file variants) with its --template, --allow-missing-template-keys
// and --show-managed-fields. Without -o (or --template) the subcommand prints
// its own human output.
type outputFlags struct {
	print *genericclioptions.PrintFlags
	// report: what is printed is not an API object but a plain report (verify).
	// -o json and yaml encode it as it is (cli-runtime's JSON and YAML
	// printers insist on an apiVersion and kind), and there is no -o name.
	report bool
	// wide: -o wide is allowed too (a table with more columns), which the
	// subcommand prints itself.
	wide bool
}

// addObjectOutput adds -o for a subcommand that prints one API object.
// what says what -o prints, for the flag's help.
func addObjectOutput(cmd *cobra.Command, what string) *outputFlags {
	f := &outputFlags{print: genericclioptions.NewPrintFlags("")}
	f.addFlags(cmd, what)
	return f
}

// addListOutput adds -o for a subcommand that lists API objects: kubectl
// get's formats, wide included.
func addListOutput(cmd *cobra.Command, what string) *outputFlags {
	f := &outputFlags{wide: true, print: genericclioptions.NewPrintFlags("")}
	f.addFlags(cmd, what)
	return f
}

// addReportOutput adds -o for a subcommand that prints a report (JSON data
// without apiVersion and kind).
func addReportOutput(cmd *cobra.Command, what string) *outputFlags {
	format := ""
	f := &outputFlags{report: true, print: &genericclioptions.PrintFlags{
		OutputFormat:         &format,
		TemplatePrinterFlags: genericclioptions.NewKubeTemplatePrintFlags(),
	}}
	f.addFlags(cmd, what)
	return f
}

func (f *outputFlags) addFlags(cmd *cobra.Command, what string) {
	f.print.AddFlags(cmd)
	cmd.Flags().Lookup("output").Usage = fmt.Sprintf("Output format, one of: %s (prints %s).", strings.Join(f.allowedFormats(), ", "), what)
}

func (f *outputFlags) allowedFormats() []string {
	if f.report {
		return append([]string{"json", "yaml"}, f.print.AllowedFormats()...)
	}
	if f.wide {
		return append(f.print.AllowedFormats(), "wide")
	}
	return f.print.AllowedFormats()
}

func (f *outputFlags) format() string { return strings.ToLower(*f.print.OutputFormat) }

// human: neither -o nor --template was given.
func (f *outputFlags) human() bool {
	t := f.print.TemplatePrinterFlags.TemplateArgument
	return f.format() == "" && (t == nil || *t == "")
}

// objectPrinter returns the printer for -o or --template, and nil for the
// human output: the check every command that prints a VolumePair makes
// before any work.
func (f *outputFlags) objectPrinter() (printers.ResourcePrinter, error) {
	if f.human() {
		return nil, nil
	}
	return f.printer()
}

// printer returns the printer -o asks for; an unknown format or a template
// that does not parse is an error. For a report's json and yaml it returns
// nil: printReport encodes those itself. Call it before any work, so that a
// mistyped -o fails at once.
func (f *outputFlags) printer() (printers.ResourcePrinter, error) {
	if f.report && (f.format() == "json" || f.format() == "yaml") {
		return nil, nil
	}
	p, err := f.print.ToPrinter()
	if genericclioptions.IsNoCompatiblePrinterError(err) {
		return nil, fmt.Errorf("unknown output format %q: want one of %s", *f.print.OutputFormat, strings.Join(f.allowedFormats(), ", "))
	}
	if err != nil {
		return nil, fmt.Errorf("output format %q: %w", *f.print.OutputFormat, err)
	}
	return p, nil
}

// templated: -o is a template (jsonpath, go-template...), not one of the
// encodings or name.
func (f *outputFlags) templated() bool {
	switch f.format() {
	case "json", "yaml", "kyaml", "name", "wide":
		return false
	}
	return !f.human()
}

// printObject prints obj with p (from printer) as kubectl get -o does: with
// its apiVersion and kind, and in json and yaml without managed fields
// unless --show-managed-fields.
func (f *outputFlags) printObject(p printers.ResourcePrinter, w io.Writer, obj client.Object, gvk schema.GroupVersionKind) error {
	obj = obj.DeepCopyObject().(client.Object)
	obj.GetObjectKind().SetGroupVersionKind(gvk)
	var in runtime.Object = obj
	if f.templated() {
		var err error
		if in, err = templateInput(obj); err != nil {
			return err
		}
	}
	if err := p.PrintObj(in, w); err != nil {
		return fmt.Errorf("print %s %s: %w", strings.ToLower(gvk.Kind), obj.GetName(), err)
	}
	return nil
}

// printReport prints a report with p (from printer): as indented JSON or
// YAML when p is nil, else with p (a template printer), which sees the
// report's JSON.
func (f *outputFlags) printReport(p printers.ResourcePrinter, w io.Writer, v any) error {
	if p == nil {
		return printData(w, v, f.format())
	}
	in, err := templateInput(v)
	if err != nil {
		return err
	}
	if err := p.PrintObj(in, w); err != nil {
		return fmt.Errorf("print the report: %w", err)
	}
	return nil
}

// templateInput is what the template printers get: v's JSON as unstructured
// data, decoded the way kubectl get's objects are, with integers kept as
// integers. (Given a typed object, the jsonpath printer decodes its JSON with
// encoding/json itself, and 6553600 would print as 6.5536e+06.)
func templateInput(v any) (runtime.Object, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	m := map[string]any{}
	if err := utiljson.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("decode json: %w", err)
	}
	return &unstructured.Unstructured{Object: m}, nil
}

// printData writes v as indented JSON or YAML.
func printData(w io.Writer, v any, format string) error {
	var (
		b   []byte
		err error
	)
	if format == "yaml" {
		b, err = yaml.Marshal(v)
	} else {
		b, err = json.MarshalIndent(v, "", "    ")
		b = append(b, '\n')
	}
	if err != nil {
		return fmt.Errorf("encode %s: %w", format, err)
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write output: %w", err)
	}
	return nil
}
