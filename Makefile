VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test worker kafka schemas bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed  ## embedded broker + worker + synthetic CRM traffic; Ctrl-C stops it all
	$(VENV)/bin/crm-pulse demo

worker: $(VENV)/.installed  ## the worker alone (CRM_PULSE_BROKER=kafka://host:port, else embedded)
	$(VENV)/bin/crm-pulse worker

kafka: $(VENV)/.installed  ## Apache Kafka (deploy/kafka/pom.xml, jars cached in .kafka/) on a free loopback port
	$(VENV)/bin/crm-pulse kafka

test: $(VENV)/.installed  ## every test on the embedded Tansu, then the integration tests again on Apache Kafka
	$(PY) -m pytest $(PYTEST_ARGS)
	CRM_PULSE_EMBEDDED_BROKER=kafka $(PY) -m pytest -m integration $(PYTEST_ARGS)

schemas: $(VENV)/.installed  ## regenerate schemas/jsonschema/ from the models
	$(PY) -m crm_pulse.schemas.generate

bench: $(VENV)/.installed  ## bench/: throughput, latency, stall scan, recovery, scale-out, on Tansu and Apache Kafka → bench/results.json + .png
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info data
