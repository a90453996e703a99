module example.com/devflow-fixture-go

go 1.19
