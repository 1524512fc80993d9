from tests.fixtures_simulator import llm_simulator, sim  # noqa: F401  (fixtures shared by every test module)
