// Command image writes a container image archive without a container
// engine: one layer holding the given files, an image config, and a tar
// that `ctr -n k8s.io images import` and `docker load` read (see package
// ociarchive). `make image` runs it for Tandem's image and the pause image.
//
//	go run ./hack/image --name ghcr.io/tandem-storage/tandem:dev \
//	  --out bin/images/tandem.tar \
//	  --file /usr/local/bin/manager=bin/image/manager ... \
//	  --user 65532:65532 --entrypoint /usr/local/bin/manager \
//	  --label org.opencontainers.image.licenses=Apache-2.0
//
// It prints the image's name, manifest digest and archive path.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/tandem-storage/tandem/hack/image/ociarchive"
)

// listFlag collects a repeated flag's values in order.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, " ") }
func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// options are the parsed command line.
type options struct {
	name string
	out  string
	spec ociarchive.Spec
}

func parseArgs(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		o                                 options
		files, entrypoint, cmd, env, labs listFlag
	)
	fs.StringVar(&o.name, "name", "", "image name with tag, e.g. ghcr.io/tandem-storage/tandem:dev (required)")
	fs.StringVar(&o.out, "out", "", "archive to write, e.g. bin/images/tandem.tar (required)")
	fs.Var(&files, "file", "IMAGE_PATH=LOCAL_FILE: a file of the image (repeatable)")
	fs.StringVar(&o.spec.User, "user", "", "user[:group] the entrypoint runs as, e.g. 65532:65532")
	fs.Var(&entrypoint, "entrypoint", "entrypoint element (repeat for arguments)")
	fs.Var(&cmd, "cmd", "default argument, appended to the entrypoint (repeatable)")
	fs.Var(&env, "env", "KEY=VALUE environment variable (repeatable)")
	fs.Var(&labs, "label", "KEY=VALUE label (repeatable)")
	fs.StringVar(&o.spec.OS, "os", "linux", "the binaries' GOOS")
	fs.StringVar(&o.spec.Arch, "arch", runtime.GOARCH, "the binaries' GOARCH")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.name == "" || o.out == "" {
		return options{}, errors.New("--name and --out are required")
	}
	if len(files) == 0 {
		return options{}, errors.New("at least one --file is required")
	}
	for _, f := range files {
		dst, src, ok := strings.Cut(f, "=")
		if !ok || dst == "" || src == "" {
			return options{}, fmt.Errorf("--file %q: want IMAGE_PATH=LOCAL_FILE", f)
		}
		o.spec.Files = append(o.spec.Files, ociarchive.File{Path: dst, Source: src})
	}
	for _, e := range env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return options{}, fmt.Errorf("--env %q: want KEY=VALUE", e)
		}
	}
	for _, l := range labs {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return options{}, fmt.Errorf("--label %q: want KEY=VALUE", l)
		}
		if o.spec.Labels == nil {
			o.spec.Labels = map[string]string{}
		}
		if _, dup := o.spec.Labels[k]; dup {
			return options{}, fmt.Errorf("--label %s given twice", k)
		}
		o.spec.Labels[k] = v
	}
	o.spec.Entrypoint, o.spec.Cmd, o.spec.Env = entrypoint, cmd, env
	o.spec.CreatedBy = "hack/image"
	return o, nil
}

func run(args []string, stdout, stderr io.Writer) error {
	o, err := parseArgs(args, stderr)
	if err != nil {
		return err
	}
	ref, err := ociarchive.ParseReference(o.name)
	if err != nil {
		return err
	}
	img, err := ociarchive.Build(o.spec)
	if err != nil {
		return err
	}
	res, err := ociarchive.WriteFile(o.out, ref, img)
	if err != nil {
		return err
	}
	st, err := os.Stat(o.out)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s %s %s (%.1f MB, image ID %s)\n", ref.Name, res.Digest, o.out, float64(st.Size())/1e6, res.ConfigDigest)
	return nil
}

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(2)
	}
}
